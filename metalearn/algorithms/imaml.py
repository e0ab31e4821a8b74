"""iMAML: implicit model-agnostic meta-learning.

Rajeswaran, Finn, Kakade, Levine. "Meta-Learning with Implicit Gradients." NeurIPS 2019.
https://arxiv.org/abs/1909.04630   (code: github.com/aravindr93/imaml_dev)

For task i with support loss L_S (the paper's training loss L^_i) and query loss L_Q (its test
loss L_i), the inner problem is proximal (Eq. 4):

    phi_i = Alg*_i(theta) = argmin_phi  L_S(phi) + lam/2 ||phi - theta||^2

solved approximately by `inner.steps` steps of gradient descent with lr alpha = `inner.lr`, from
phi = theta (the paper's "iMAML, GD" variant; not its Hessian-free inner solver):

    phi <- phi - alpha * (grad L_S(phi) + lam (phi - theta))                      (rule `Proximal`)

The inner gradients are constants (first order): nothing of the inner path is kept, so memory does not
grow with the number of inner steps.

The meta-gradient is implicit (Lemma 1). Differentiating the stationarity condition
grad L_S(phi) + lam (phi - theta) = 0 in theta gives (H + lam I) d phi = lam d theta, where

    H = hess_phi L_S(phi_i)          the Hessian of the support loss ALONE at phi_i
                                     (the proximal term adds the lam I), so
    d phi_i / d theta = (I + H / lam)^{-1}                                       (symmetric)
    g_i = d L_Q(phi_i) / d theta = (I + H / lam)^{-1} grad_phi L_Q(phi_i)

g_i is approximated (Sec. 3.1) by `imaml.cg_steps` iterations of conjugate gradient, from g = 0, on

    ((1 + cg_damping) I + H / lam) g_i = v_i,     v_i = grad_phi L_Q(phi_i)

with H u = d/dphi [grad_phi L_S(phi) . u] (one double backward of the support loss at phi_i per CG
iteration), and the outer step is Adam on (1/T) sum_i g_i (`outer.lr`).

Parameters outside `inner.adapt` (w, shared by the tasks and held fixed in the inner loop) move
phi_i too. The same implicit differentiation, of grad_phi L_S(phi, w) + lam (phi - theta) = 0 in w,
gives their exact gradient, the limit of differentiating through a converged proximal inner loop
(second order, as MAML does; tests/test_imaml.py):

    d L_Q / d w = dL_Q/dw (direct) - (d^2 L_S / dw dphi) (H + lam I)^{-1} v_i
                = dL_Q/dw - (1/lam) d/dw [grad_phi L_S(phi_i, w) . g_i]      (g_i held constant)

one more double backward per task (skipped when every trained parameter adapts).

Conjugate gradient on an indefinite system. Lemma 1 assumes phi_i is a smooth local minimum of the proximal
objective, so that I + H / lam is positive definite. For conv4 with few-shot BatchNorm it is not, in general:
at initialisation on a real Omniglot 5-way 1-shot support set the support Hessian's eigenvalues spanned about
[-75, 46] (hidden 8; power iteration), so I + H / lam is indefinite for the paper's lam = 2; and ReLU/max-pool
make the objective piecewise smooth, its minimiser usually sitting on a kink where gradient descent chatters
(the proximal gradient stayed O(1) for lam from 30 to 1000 on every episode tried; tests/test_imaml.py). Plain
CG then diverges (relative residuals up to ~150 measured in training). `conjugate_gradient` therefore stops at
non-positive curvature, returns the iterate with the smallest residual, and returns v itself (the first-order
answer) where no iterate beats g = 0. On a positive definite system whose residuals fall monotonically (the
tests' exact settings) this is plain CG.

Metrics of a meta-step: the query loss and accuracy (or MSE) at phi_i; `cg_residual`, the mean over tasks of
the returned solution's relative residual ||v_i - A g_i|| / ||v_i|| (CG's recurrence; 1 where v_i was
returned); `prox_grad_norm`, the mean norm of the proximal objective's gradient at phi_i (0 at the exact
inner solution Lemma 1 assumes).

Evaluation: the same proximal inner loop from theta (test-time `steps`/`lr` overrides, the same lam),
scored transductively or not (`scored`).

Deviations from the paper and its code: plain gradient descent in the inner loop (paper's GD variant);
CG from g = 0 with the safeguards above and an optional extra diagonal `cg_damping` (0 = the paper's
system; the authors' code solves (1 + r) g + H g / (lam + d) = v with r = 1, d = 10 by default, a heavily
damped system); the authors' code runs the inner loop without the proximal term and then takes one pull-back
step towards theta, and adapts at test time with lam = 0; here the inner problem is Eq. 4, in training and at
evaluation. The tasks are adapted one after another (no batched path).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import MetalearnError
from ..inner import SGD, adapt, forward, select
from ..types import Examples, Params, TaskBatch
from .base import LossSpec, MetaLearner, MetricSpec, scored
from .registry import Capabilities, register


class Proximal:
    """An inner update rule on the proximal objective L(phi) + lam/2 ||phi - anchor||^2: `rule` applied to
    the gradient g + lam (phi - anchor). First order by construction: it returns fresh leaves (requiring grad,
    for the next step's gradient), so no graph links one step to the next. (A graph of the updates alone,
    without any activation, still grew the process by ~0.5 MB per step for conv4 with 64 filters.)"""

    def __init__(self, rule, anchor: Params, lam: float):
        self.rule, self.anchor, self.lam = rule, anchor, lam

    def init(self, params: Params, names: Sequence[str]):
        return self.rule.init(params, names)

    def step(self, fast: Params, grads: Dict[str, Tensor], state, step: int):
        with torch.no_grad():
            prox = {n: g + self.lam * (fast[n] - self.anchor[n]) for n, g in grads.items()}
            new, state = self.rule.step(fast, prox, state, step)
        return {n: p.requires_grad_(True) if n in grads else p for n, p in new.items()}, state


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int) -> Tuple[Tensor, float]:
    """x ~ A^{-1} b by `steps` iterations of conjugate gradient from x = 0 (A symmetric, given by matvec).

    Returns (x, ||b - A x|| / ||b||), the residual from CG's recurrence. On a positive definite A whose
    residuals fall at every iteration (the tests' settings) this is plain CG. Safeguards for an indefinite A
    (see the module docstring): CG stops at a direction of non-positive curvature (truncated CG), the
    iterate with the smallest residual is returned, and where no iterate does better than x = 0 (relative
    residual 1), b itself is returned (A taken as I: the first-order answer) with residual reported as 1."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), torch.dot(r, r)
    b_norm = rr.sqrt()
    best, best_rr = b, rr
    for _ in range(steps):
        if rr == 0:
            break
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        if pAp <= 0:
            break
        alpha = rr / pAp
        x, r = x + alpha * p, r - alpha * Ap
        rr_new = torch.dot(r, r)
        p, rr = r + (rr_new / rr) * p, rr_new
        if rr < best_rr:
            best, best_rr = x, rr
    return best, (best_rr.sqrt() / b_norm).item() if b_norm > 0 else 0.0


def _flat(tensors: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> Tensor:
    """One vector of `tensors` (None, an unused parameter's gradient, as zeros shaped like `like`)."""
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like)])


def _unflat(vec: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """`vec` cut into views shaped like the tensors of `like` (the inverse of `_flat`)."""
    out, i = [], 0
    for p in like:
        out.append(vec[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


@register("imaml")
class IMAML(MetaLearner):
    """iMAML with a gradient-descent inner solver and a conjugate-gradient implicit meta-gradient."""

    capabilities = Capabilities(shardable=True)  # tasks independent; adapted one after another (no batched path)

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, lam: float, cg_steps: int = 5,
                 cg_damping: float = 0.0, adapt: Sequence[str] = ("*",),
                 loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, loss=loss, metric=metric)
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise MetalearnError(f"imaml.lam must be a finite number > 0, got {lam}")
        if not isinstance(cg_steps, int) or cg_steps < 1:
            raise MetalearnError(f"imaml.cg_steps must be an integer >= 1, got {cg_steps}")
        if not (math.isfinite(cg_damping) and cg_damping >= 0):
            raise MetalearnError(f"imaml.cg_damping must be a finite number >= 0, got {cg_damping}")
        if inner_steps < 1:
            raise MetalearnError(f"imaml needs inner.steps >= 1 (the inner problem is solved by gradient descent), "
                                 f"got {inner_steps}")
        if inner_lr * lam >= 2:
            raise MetalearnError(f"imaml: inner.lr * imaml.lam = {inner_lr * lam:g} must be < 2, or the proximal "
                                 f"term alone makes the inner gradient descent diverge")
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.lam, self.cg_steps, self.cg_damping = float(lam), cg_steps, float(cg_damping)
        self.adapt = select([n for n, _ in model.named_parameters()], adapt, what="inner.adapt")

    @classmethod
    def from_config(cls, cfg, model: nn.Module, loss: str = "cross_entropy") -> "IMAML":
        cls.check_config(cfg)
        if cfg.inner.first_order:
            raise MetalearnError("inner.first_order: imaml's meta-gradient is implicit (its inner loop is always "
                                 "first order); set imaml.cg_steps, or use fomaml")
        algorithm = cls(model, inner_lr=cfg.inner.lr, inner_steps=cfg.inner.steps, lam=cfg.imaml.lam,
                        cg_steps=cfg.imaml.cg_steps, cg_damping=cfg.imaml.cg_damping,
                        adapt=cls.configured_adapt(cfg), loss=loss)
        algorithm.lr_halve_every = cfg.outer.lr_halve_every
        return algorithm

    # --- inner loop ---------------------------------------------------------------------------
    def adapt_task(self, theta: Params, support: Examples, *, steps: Optional[int] = None,
                   lr: Optional[float] = None) -> Params:
        """phi ~ argmin L_S(phi) + lam/2 ||phi - theta||^2: `steps` proximal gradient steps from theta,
        first order; returns phi detached (the parameters outside `adapt` are theta's)."""
        theta = {n: p.detach() for n, p in theta.items()}
        start = {n: p.detach().requires_grad_(n in self.adapt) for n, p in theta.items()}
        rule = Proximal(SGD(self.inner_lr if lr is None else lr), theta, self.lam)
        res = adapt(lambda p, x, s: forward(self.model, p, x), start, support.x, support.y, names=self.adapt,
                    rule=rule, steps=self.inner_steps if steps is None else steps, first_order=True,
                    loss_fn=self.loss_fn)
        return {n: p.detach() for n, p in res.params.items()}

    # --- the implicit meta-gradient -----------------------------------------------------------
    def implicit_gradient(self, theta: Params, phi: Params, support: Examples, query: Examples,
                          shared: Sequence[str] = ()) -> Tuple[Dict[str, Tensor], Dict[str, float]]:
        """One task's meta-gradient at the inner solution phi (adapted names) of the problem anchored at theta.

        Returns ({name: d L_Q / d theta[name]} for the adapted names and for `shared` (names outside
        `adapt` whose gradient is wanted), metrics {loss, metric, cg_residual, prox_grad_norm})."""
        names = list(self.adapt)
        shared = [n for n in shared if n not in self.adapt]
        params = {n: p.detach().requires_grad_(n in names or n in shared) for n, p in phi.items()}
        adapted = [params[n] for n in names]
        ws = [params[n] for n in shared]
        with torch.enable_grad():
            out = forward(self.model, params, query.x)
            loss_q = self.loss_fn(out, query.y)
            grads_q = torch.autograd.grad(loss_q, adapted + ws, allow_unused=True)
            v = _flat(grads_q[:len(names)], adapted)
            loss_s = self.loss_fn(forward(self.model, params, support.x), support.y)
            grads_s = _flat(torch.autograd.grad(loss_s, adapted, create_graph=True, allow_unused=True), adapted)

            def hvp(u: Tensor, wrt: List[Tensor], retain: bool = True) -> List[Optional[Tensor]]:
                """d/d wrt of grad_phi L_S . u (H u for wrt = the adapted tensors)."""
                if not grads_s.requires_grad:  # a support gradient constant in phi: H = 0
                    return [None] * len(wrt)
                return list(torch.autograd.grad(grads_s, wrt, grad_outputs=u, retain_graph=retain, allow_unused=True))

            damping, lam = 1.0 + self.cg_damping, self.lam
            g, residual = conjugate_gradient(lambda u: damping * u + _flat(hvp(u, adapted), adapted) / lam, v,
                                             self.cg_steps)
            result = dict(zip(names, _unflat(g, adapted)))
            if ws:
                cross = hvp(g / lam, ws, retain=False)
                for n, w, direct, c in zip(shared, ws, grads_q[len(names):], cross):
                    d = torch.zeros_like(w) if direct is None else direct
                    result[n] = d if c is None else d - c
        prox = grads_s.detach() + lam * torch.cat([(params[n].detach() - theta[n].detach()).reshape(-1)
                                                   for n in names])
        metrics = {"loss": loss_q.item(), "metric": self.score(out.detach(), query.y).item(),
                   "cg_residual": residual, "prox_grad_norm": prox.norm().item()}
        return result, metrics

    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """Accumulate (1/T) sum_i g_i into `.grad` (the implicit gradient of each adapted parameter, the
        exact gradient of each trained shared one); returns the mean metrics over the tasks."""
        params = self.params()
        theta = {n: p.detach() for n, p in params.items()}
        shared = [n for n, p in params.items() if n not in self.adapt and p.requires_grad]
        T = batch.num_tasks
        total = {n: torch.zeros_like(theta[n]) for n in [*self.adapt, *shared]}
        sums = {"loss": 0.0, "metric": 0.0, "cg_residual": 0.0, "prox_grad_norm": 0.0}
        for i in range(T):
            support, query = batch.support.task(i), batch.query.task(i)
            phi = self.adapt_task(theta, support)
            grads, m = self.implicit_gradient(theta, phi, support, query, shared)
            for n, g in grads.items():
                total[n] += g / T
            for k in sums:
                sums[k] += m[k] / T
        for n, g in total.items():
            p = params[n]
            if p.requires_grad:
                p.grad = g if p.grad is None else p.grad + g
        return {"loss": sums["loss"], self.metric_name: sums["metric"], "cg_residual": sums["cg_residual"],
                "prox_grad_norm": sums["prox_grad_norm"]}

    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        """Query accuracy (or MSE) per task after the proximal inner loop, (T,) float64."""
        theta = {n: p.detach() for n, p in self.params().items()}
        out = []
        for i in range(batch.num_tasks):
            phi = self.adapt_task(theta, batch.support.task(i), steps=steps, lr=lr)
            pred = scored(lambda x: forward(self.model, phi, x), batch.support.x[i], batch.query.x[i], transductive)
            out.append(self.score(pred, batch.query.y[i]))
            self.episode_done()
        return torch.stack(out).cpu()
