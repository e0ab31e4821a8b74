"""R2-D2 and MetaOptNet-RR: a differentiable closed-form ridge-regression head (no inner gradients).

Bertinetto, Henriques, Torr, Vedaldi. "Meta-learning with differentiable closed-form solvers." ICLR 2019.
https://arxiv.org/abs/1805.08136   (code: github.com/bertinetto/r2d2)
Lee, Maji, Ravichandran, Soatto. "Meta-Learning with Differentiable Convex Optimization." CVPR 2019.
https://arxiv.org/abs/1904.03758   (code: github.com/kjunelee/MetaOptNet; its ridge-regression head)

With the body f_theta (conv4's `features`, flattened, as ProtoNet's embedding; the model's head is
unused), for each task with n = N*K support examples (Sec. 3.2 of R2-D2):

    Z = f_theta(x_S)  (n, d),   Y = one_hot(y_S)  (n, N)
    W = argmin_W ||Z W - Y||^2 + lam ||W||^2
      = (Z^T Z + lam I_d)^{-1} Z^T Y        primal: a d x d system, used when n >= d
      = Z^T (Z Z^T + lam I_n)^{-1} Y        Woodbury identity: an n x n system, used when n < d
    logits = alpha * f_theta(x_Q) W + beta  (alpha, beta: R2-D2's learned scale and offset)
    (theta, alpha, beta, log lam) <- Adam on (1/T) sum_i CE(logits_i, y_Q_i)

The systems are symmetric positive definite (lam > 0) and solved by torch.linalg.solve, which is
differentiable: the meta-gradient reaches theta through Z and f_theta(x_Q), and alpha, beta and lam
directly (tests/test_r2d2.py checks it against central finite differences in float64). lam is learned
as log lam (it stays positive) when learn_lam, else fixed. Both forms give the same W (the Woodbury
form costs O(n^2 d) instead of O(d^3) in the few-shot regime n << d).

Heads (r2d2.head):
  r2d2           as Bertinetto's code: Z_S and Z_Q get a column of ones (the last row of W is a per-class
                 bias, penalised like the weights), and Z_S, Y are divided by sqrt(n), which gives the W
                 above with lam replaced by n * lam (lam is per support example); alpha, beta learned.
  metaoptnet_rr  Lee et al.'s ridge head: plain Z, lam as given, logits = alpha * Z_Q W (beta fixed at 0).
                 MetaOptNet solves the dual QP of this problem with qpth; its solution is 2 (Z Z^T + lam I)^{-1} Y
                 (the QP's linear term is -2Y), so its logits are scale * 2 Z_Q W: their scale 1 is alpha = 2
                 here. Their settings: r2d2.lam=50 r2d2.learn_lam=false r2d2.scale=2.
MetaOptNet's SVM head (a QP with inequality constraints) is not here: its differentiable solver, qpth,
requires numpy < 2.

Note: beta adds the same constant to every class's logit, so neither the cross-entropy nor the accuracy
depends on it: its gradient is zero up to float rounding (it matters in R2-D2's binary logistic variant).
It is kept, trained and saved for fidelity; Adam, which normalises its steps, may move it on rounding
noise alone (measured: 0.0015 after 30 float32 steps at lr 5e-3), with no effect on any output.

Because no parameter is tied to the number of classes, training ways may differ from test ways
(R2-D2's code trains Omniglot 60-way and tests 5-way, as ProtoNet). BatchNorm (transductive): the
support and the query set are each normalised with their own batch statistics, as ProtoNet here (R2-D2's
code embeds them as one batch); non-transductive scoring embeds each query example together with the
support set. The head runs in the parameters' dtype, outside autocast (bf16 would be a poor solver).

Deviations from R2-D2: the conv4 body (R2-D2: 96-192-384-512 filters, leaky ReLU, the last two blocks'
features concatenated, dropout); training episodes with a fixed number of shots (R2-D2's code draws
1-9 shots per training episode); see metalearn/presets/configs/r2d2_omniglot_5w1s.yaml for the protocol.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MetalearnError
from .protonet import ProtoNet
from .base import LossSpec, MetricSpec
from .registry import Capabilities, register

HEADS = ("r2d2", "metaoptnet_rr")


def ridge_form(n: int, d: int) -> str:
    """Which system `ridge_solution` solves for n examples of d features: "woodbury" (n x n) when n < d, else
    "primal" (d x d)."""
    return "woodbury" if n < d else "primal"


def ridge_solution(z: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    """W (d, N) = argmin ||z W - y||^2 + lam ||W||^2 for z (n, d), targets y (n, N), lam > 0 (a scalar tensor
    or float); differentiable in z, y and lam."""
    n, d = z.shape
    if ridge_form(n, d) == "woodbury":
        eye = torch.eye(n, dtype=z.dtype, device=z.device)
        return z.T @ torch.linalg.solve(z @ z.T + lam * eye, y)  # Z^T (Z Z^T + lam I_n)^{-1} Y
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    return torch.linalg.solve(z.T @ z + lam * eye, z.T @ y)  # (Z^T Z + lam I_d)^{-1} Z^T Y


def ridge_logits(z_support: Tensor, y_support: Tensor, z_query: Tensor, ways: int, *, lam: Tensor, alpha: Tensor,
                 beta: Tensor, head: str = "r2d2") -> Tensor:
    """Query logits (Q, N) of the ridge head fitted to support features (n, d) with labels (n,) in 0..N-1."""
    y = F.one_hot(y_support, ways).to(z_support.dtype)
    if head == "r2d2":  # a bias column, and lam per support example (R2-D2's 1/sqrt(n) scaling of Z_S and Y)
        z_support = torch.cat([z_support, z_support.new_ones(len(z_support), 1)], 1)
        z_query = torch.cat([z_query, z_query.new_ones(len(z_query), 1)], 1)
        lam = lam * len(y)
    w = ridge_solution(z_support, y, lam)
    return alpha * (z_query @ w) + beta


@register("r2d2")
class R2D2(ProtoNet):
    """ProtoNet's embedding, episode loop and evaluation with a closed-form ridge head (`logits`)."""

    label = "r2d2"
    capabilities = Capabilities(inner_loop=False, test_ways_may_differ=True, regression=False)

    def __init__(self, model: nn.Module, *, head: str = "r2d2", lam: float = 1.0, learn_lam: bool = True,
                 scale: float = 1.0, loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, loss=loss, metric=metric)  # a classifier with a `features` body
        if head not in HEADS:
            raise MetalearnError(f"r2d2.head must be one of {', '.join(HEADS)}, got {head!r}")
        if not (math.isfinite(lam) and lam > 0):
            raise MetalearnError(f"r2d2.lam must be a finite number > 0, got {lam}")
        if not math.isfinite(scale):
            raise MetalearnError(f"r2d2.scale must be a finite number, got {scale}")
        like = next(model.parameters())
        new = lambda v, learned: nn.Parameter(torch.tensor(float(v), dtype=like.dtype, device=like.device),  # noqa: E731
                                              requires_grad=learned)
        self.head = str(head)
        self.alpha = new(scale, True)
        self.beta = new(0.0, self.head == "r2d2")
        self.log_lam = new(math.log(lam), bool(learn_lam))

    @classmethod
    def from_config(cls, cfg, model: nn.Module, loss: str = "cross_entropy") -> "R2D2":
        cls.check_config(cfg)
        r = cfg.r2d2
        algorithm = cls(model, head=str(r.head), lam=r.lam, learn_lam=r.learn_lam, scale=r.scale, loss=loss)
        algorithm.lr_halve_every = cfg.outer.lr_halve_every
        return algorithm

    @property
    def lam(self) -> Tensor:
        return self.log_lam.exp()

    # --- the head ----------------------------------------------------------------------------------
    def logits(self, z_support: Tensor, y_support: Tensor, z_query: Tensor, ways: int) -> Tensor:
        """The ridge head's query logits (Q, N), in the learnables' dtype and outside autocast."""
        dtype = self.alpha.dtype
        with torch.autocast(z_support.device.type, enabled=False):
            return ridge_logits(z_support.to(dtype), y_support, z_query.to(dtype), ways, lam=self.lam,
                                alpha=self.alpha, beta=self.beta, head=self.head)

    # --- outer loop -------------------------------------------------------------------------------
    def meta_parameters(self) -> List[nn.Parameter]:
        """[alpha, beta, log lam], less those that stay fixed (beta for metaoptnet_rr; log lam unless learn_lam)."""
        return [p for p in (self.alpha, self.beta, self.log_lam) if p.requires_grad]

    def state_dict(self) -> dict:
        """{"alpha", "beta", "log_lam"}: scalar tensors (the fixed ones too)."""
        return {"alpha": self.alpha.detach().clone(), "beta": self.beta.detach().clone(),
                "log_lam": self.log_lam.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        mine = {"alpha": self.alpha, "beta": self.beta, "log_lam": self.log_lam}
        if set(state) != set(mine):
            raise MetalearnError(f"r2d2 state: expected keys {sorted(mine)}, got {sorted(state)}")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(torch.as_tensor(state[k]).reshape(()))
