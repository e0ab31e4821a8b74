"""The meta-step (and evaluation's adaptation) as one pure torch.func function, run through torch.compile
(opt-in: `outer.compile=true`, `Engine(..., compile=True)`), and refused where it is not exact.

For a GradientMetaLearner the meta-gradient of one task is written with torch.func, from the algorithm's own
declaration (mask `adapt`, `rule(...)`, `inner_steps`, `current_first_order()`, `forward_fn`, `loss_fn`):

    theta_{s+1}[n] = theta_s[n] - lr(n, s) * g_s[n],   g_s = torch.func.grad(L_support)(theta_s)[n],  n in adapt
    (first order: g_s is a constant, `.detach()`ed; a learned lr stays differentiated)
    (grad_theta, grad_lr), (L_Q, outputs) = torch.func.grad_and_value(L_Q(theta_S))(theta, lr)

and the meta-step accumulates (1/T) sum_t of it into `.grad` exactly as `Engine.meta_step` does, returning
{"loss": mean query loss, metric: mean score}. Evaluation's adaptation is the same inner loop, first order,
followed by the query pass (no outer gradient). Two ways to run a batch (`vmap`):

    per task (default)  the compiled one-task function called for each task (compiled once, whatever T);
    vmapped             torch.func.vmap of it over the tasks, with BatchNorm in the vmap-exact form of
                        metalearn/inner/norm.py (`vmap_safe_norms`), as the engine's batched path.

Exactness gate. The first time a function meets a new input (shapes, dtype, device, steps, lr, first or
second order), the compiled result and the eager torch.func result of the same batch are both computed and
compared by the relative L2 error over ALL parameters together, ||g_compiled - g_eager|| / ||g_eager|| (one
number: a conv bias right before BatchNorm has a zero true gradient, so its own relative error is noise). Above
`TOLERANCE` (float64: 1e-10; float32: 1e-3, or, where float32 rounding alone moves the eager result further from
float64 on this batch, ROUNDING_FACTOR times that) the step is refused with a MetalearnError naming the distance,
before any `.grad` is touched (so the optimiser never steps with it); evaluation compares the query outputs the
same way. Later calls with that input run the compiled function alone.

Costs. Compilation takes minutes on a CPU (the first time: torch's inductor caches compiled graphs on disk,
under `cache_dir()`, so a second run of the same model and shapes starts in seconds); the progress output says
when it happens and how long it took. Shapes are static (`dynamic=False`, marked so): a new shape (ways, shots,
query examples, image size; vmapped, also the number of tasks, as in the last, smaller evaluation batch) compiles
anew, and every new input is gated anew. After torch._dynamo's recompile limit (8 per function) torch runs the
function eagerly, still exact.

Supported: maml, fomaml, boil (any inner mask), metasgd (its learned lrs are differentiated inputs), any
forward, loss and metric of theirs that torch.compile can trace in one graph. Refused, with the reason, by
`unsupported`: algorithms with their own per-task step, LoRA, ANIL's cached features, MAML++'s multi-step loss,
per-task extra parameters (CAVIA), an inner rule other than SGD (Adam), inner-loop checkpointing, autocast.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import functional_call, grad, grad_and_value, vmap

from .algorithms.base import GradientMetaLearner
from .algorithms.registry import supporting
from .errors import MetalearnError
from .inner.norm import stateless, vmap_safe_norms
from .inner.rules import SGD, _LRTable
from .types import Params, TaskBatch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-3}
"""Largest relative L2 distance (all parameters together) allowed between the compiled and the eager result.
float64: rounding alone is ~1e-15, so 1e-10 proves the compiled function is the eager one. float32: most tasks
agree to ~1e-6 (the issue measured 2.5e-6 on conv4), but the meta-gradient is only piecewise smooth (max-pool,
ReLU), and the two float32 roundings sometimes break a near-tie differently: measured on conv4 (64 filters,
28x28 noise images, 5-way 1-shot), 2 of 32 tasks' compiled gradients were 9e-4 and 1.4e-3 from float64 where the
eager ones were 3e-6 and 5e-6 (another task: the eager one 8.7e-5 off, the compiled one 2.9e-6), 1.3e-4 over the
meta-batch. Hence 1e-3: a wrongly compiled function (the vmap BatchNorm bug of DESIGN.md was 1e-2) is still caught."""
ROUNDING_FACTOR = 3.0
"""float32 only: ill-conditioned batches amplify float32 rounding everywhere (BatchNorm over a few support images
of noise, several inner steps: the loop's own float32 meta-gradient is up to ~1e-3 from float64,
benchmarks/bench_meta_step.py). Beyond TOLERANCE the gate measures it, the eager float32 result's distance r to
the same computation in float64, and allows ROUNDING_FACTOR * r (two results each ~r from the exact one are up
to 2r apart)."""


def cache_dir() -> str:
    """Where inductor keeps its compiled graphs (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_<user>)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

        return inductor_cache_dir()
    except Exception:  # an older or newer layout of torch's private modules
        return "inductor's cache folder"


def unsupported(algo: Any) -> Optional[str]:
    """Why `algo` cannot run compiled (one phrase), or None when it can."""
    name = type(algo).__name__
    if not isinstance(algo, GradientMetaLearner):
        return f"{name} runs its own per-task step"
    if algo.lora is not None:
        return "the LoRA inner loop (inner.lora_rank) runs per task through the engine"
    if algo.cached_features:
        return "ANIL's cached features run through the engine"
    if algo.inner_checkpoint:
        return "inner-loop checkpointing (inner.checkpoint) is not combined with it"
    if type(algo).task_params is not GradientMetaLearner.task_params:
        return f"{name} starts each task with extra per-task parameters"
    rule = algo.rule()
    if type(rule) is not SGD:
        return f"the inner rule is {type(rule).__name__} (SGD only)"
    if not isinstance(rule.lr, (float, int, _LRTable)):
        return f"the inner lr is a {type(rule.lr).__name__} (a float, or learned lrs such as Meta-SGD's, only)"
    if algo.query_weights() is not None:
        return "a multi-step query loss (MAML++) is not supported"
    if not algo.capabilities.compile:
        return f"{name} does not declare it (capability compile: {', '.join(supporting('compile'))})"
    return None


def check_supported(algo: Any) -> None:
    why = unsupported(algo)
    if why is not None:
        raise MetalearnError(f"outer.compile: not available: {why}; run without outer.compile")


def check_config(cfg: Any) -> None:
    """The settings outer.compile=true rules out, from the config alone (metalearn/validation.py)."""
    from .algorithms.registry import capabilities

    if not cfg.outer.compile:
        return
    name = cfg.outer.algorithm
    if not capabilities(name).compile:
        raise MetalearnError(f"outer.compile: available for {', '.join(supporting('compile'))}, not {name!r}; "
                             "run without outer.compile")
    for key, on in (("inner.lora_rank", cfg.inner.lora_rank), ("inner.checkpoint", cfg.inner.checkpoint)):
        if on:
            raise MetalearnError(f"outer.compile: not combined with {key}; run without one of them")
    if cfg.precision != "fp32":
        raise MetalearnError(f"outer.compile: precision={cfg.precision} is not supported (the exactness check "
                             "compares in full precision); use precision=fp32 or run without outer.compile")


def relative_l2(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors of the two dicts together (float64; inf if b is 0 and a is not)."""
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    den = sum(float(b[n].double().pow(2).sum()) for n in b)
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)


def _finite(d: Dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in d.values())


class CompiledMetaStep:
    """The meta-step and evaluation's adaptation of a GradientMetaLearner as compiled torch.func functions.

    compiled: False runs the same functions eagerly (the reference of the gate, and of the tests);
    vmap: the tasks at once through torch.func.vmap (else one task after another), `chunk` tasks at a time
    (0 = all; the engine's task_chunk); backend: torch.compile's; quiet: no progress output.
    """

    def __init__(self, algorithm: Any, *, compiled: bool = True, vmap: bool = False, chunk: int = 0,
                 backend: str = "inductor", quiet: bool = False):
        check_supported(algorithm)
        self.algorithm, self.compiled, self.vmap, self.backend, self.quiet = algorithm, compiled, vmap, backend, quiet
        self.chunk = chunk
        self._compiled: Dict[str, Callable] = {}
        self._checked: Dict[Tuple, float] = {}
        """input key -> the gate's distance, for every key that passed it."""

    # --- the pure functions ---------------------------------------------------------------------------
    def _lr(self, lr: Any, lrs: Params) -> Callable[[str, int], Any]:
        """lr(name, step): a float, or the learned-lr table evaluated at the tensors `lrs` (differentiated)."""
        if isinstance(lr, _LRTable):
            return lambda n, s: functional_call(lr, lrs, (n, s))
        return lambda n, s: lr

    def _inner(self, params: Params, lr: Callable[[str, int], Any], x: Tensor, y: Tensor, steps: int,
               first_order: bool) -> Params:
        """theta_S of one task: `steps` SGD steps on the support set (x, y), as metalearn.inner.adapt."""
        algo, names = self.algorithm, self.algorithm.adapt
        fast = dict(params)
        for s in range(steps):
            def support_loss(adapted: Params, fast: Params = fast, s: int = s) -> Tensor:
                return algo.loss_fn(algo.forward_fn({**fast, **adapted}, x, s), y)

            g = grad(support_loss)({n: fast[n] for n in names})
            if first_order:
                g = {n: t.detach() for n, t in g.items()}
            fast = {**fast, **{n: fast[n] - lr(n, s) * g[n] for n in names}}
        return fast

    def _task_objective(self, theta: Params, lrs: Params, frozen: Params, sx: Tensor, sy: Tensor, qx: Tensor,
                        qy: Tensor, *, steps: int, first_order: bool) -> Tuple[Tensor, Tensor]:
        """(query loss of one task after adaptation, its query outputs)."""
        algo = self.algorithm
        fast = self._inner({**frozen, **theta}, self._lr(algo.rule().lr, lrs), sx, sy, steps, first_order)
        out = algo.forward_fn(fast, qx, max(steps - 1, 0))
        return algo.loss_fn(out, qy), out

    def _gradient_fn(self, steps: int, first_order: bool) -> Callable:
        """fn(theta, lrs, frozen, sx, sy, qx, qy) -> ((grad theta, grad lrs), (loss, outputs)): one task, or, with
        vmap, all tasks (gradients summed over them; losses (T,), outputs (T, Q, ...))."""
        def objective(theta, lrs, frozen, sx, sy, qx, qy):
            return self._task_objective(theta, lrs, frozen, sx, sy, qx, qy, steps=steps, first_order=first_order)

        one = grad_and_value(objective, argnums=(0, 1), has_aux=True)
        if not self.vmap:
            return one
        every = vmap(one, in_dims=(None, None, None, 0, 0, 0, 0), randomness="different")

        def batched(theta, lrs, frozen, sx, sy, qx, qy):  # called inside vmap_safe_norms() (see _norms)
            (g_theta, g_lrs), (loss, out) = every(theta, lrs, frozen, sx, sy, qx, qy)
            return ({n: t.sum(0) for n, t in g_theta.items()}, {n: t.sum(0) for n, t in g_lrs.items()}), (loss, out)

        return batched

    def _outputs_fn(self, steps: int, lr: Optional[float]) -> Callable:
        """fn(params, lrs, sx, sy, qx) -> query outputs after a first-order adaptation (one task, or all with vmap)."""
        algo = self.algorithm

        def one(params, lrs, sx, sy, qx):
            fast = self._inner(params, self._lr(algo.rule(lr).lr, lrs), sx, sy, steps, True)
            return algo.forward_fn(fast, qx, max(steps - 1, 0))

        if not self.vmap:
            return one
        return vmap(one, in_dims=(None, None, 0, 0, 0), randomness="different")

    def _function(self, key: Tuple, make: Callable[[], Callable], compiled: bool) -> Callable:
        """The function `make()` for the input `key`: eager, or compiled (one torch.compile per kind and static
        settings, which torch._dynamo compiles again for each new shape it meets)."""
        if not (compiled and self.compiled):
            return make()
        settings = repr((key[0], key[-1]))  # not the shapes
        fn = self._compiled.get(settings)
        if fn is None:
            fn = self._compiled[settings] = self._compile(make())
        return fn

    def _compile(self, fn: Callable) -> Callable:
        """torch.compile(fn): static shapes (a new shape compiles anew), one graph (no silent eager fallback)."""
        return torch.compile(fn, backend=self.backend, dynamic=False, fullgraph=True)

    # --- the inputs ----------------------------------------------------------------------------------------
    def _learned_lrs(self, lr: Any) -> Dict[str, Any]:
        return dict(lr.named_parameters()) if isinstance(lr, _LRTable) else {}

    def _check_context(self, x: Tensor) -> None:
        if torch.is_autocast_enabled(x.device.type):
            raise MetalearnError("outer.compile: not available under autocast (precision=bf16); use precision=fp32 "
                                 "or run without outer.compile")
        if x.dtype not in TOLERANCE:
            raise MetalearnError(f"outer.compile: no exactness tolerance for {x.dtype} (float32 and float64 only); "
                                 "run without outer.compile")

    def _key(self, kind: str, batch: TaskBatch, **static: Any) -> Tuple:
        """(kind, input shapes, dtypes and devices, vmap, training mode, static settings): what the gate checks once."""
        shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in (batch.support.x, batch.support.y,
                                                                     batch.query.x, batch.query.y))
        return (kind, shapes, self.vmap, self.algorithm.model.training, tuple(sorted(static.items())))

    def _step_key(self, batch: TaskBatch) -> Tuple:
        algo = self.algorithm
        return self._key("step", batch, steps=algo.inner_steps, first_order=algo.current_first_order(),
                         lr=_static_lr(algo.rule().lr))

    def _eval_key(self, batch: TaskBatch, steps: int, lr: Optional[float]) -> Tuple:
        return self._key("eval", batch, steps=steps, lr=_static_lr(self.algorithm.rule(lr).lr))

    def _parts(self, T: int) -> List[Any]:
        """What one call of the function takes: each task (per task), or slices of `chunk` tasks (vmapped)."""
        if not self.vmap:
            return list(range(T))
        size = self.chunk or T
        return [slice(lo, min(T, lo + size)) for lo in range(0, T, size)]

    def _norms(self) -> ContextManager[None]:
        """The BatchNorm policy around a call (metalearn/inner/norm.py): vmapped, `vmap_safe_norms()`, entered
        outside the compiled function (torch.compile cannot trace a ContextVar.set). The model's `stateless`
        view is built here too, so that the compiled function only looks it up (it cannot trace its construction)."""
        stateless(self.algorithm.model, all_batch_norms=self.vmap)
        return vmap_safe_norms() if self.vmap else contextlib.nullcontext()

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"metalearn: {text}", file=sys.stderr, flush=True)

    # --- the two entry points ----------------------------------------------------------------------------
    def meta_gradient(self, batch: TaskBatch, *, compiled: bool = True, dtype: Optional[torch.dtype] = None
                      ) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
        """(mean over tasks of the meta-gradient by name: the model's trained parameters' and the learned lrs'
        as "lr:<name>", query losses (T,), query outputs (T, Q, ...)), compiled or eager; nothing is stored.
        dtype: computed with the parameters and images cast to it (the gate's float64 reference; eager)."""
        algo = self.algorithm
        steps, first_order, rule_lr = algo.inner_steps, algo.current_first_order(), algo.rule().lr
        fn = self._function(self._step_key(batch), lambda: self._gradient_fn(steps, first_order),
                            compiled and dtype is None)
        cast = _caster(dtype)
        theta = {n: cast(p) for n, p in algo.params().items() if p.requires_grad}
        frozen = {n: cast(p) for n, p in algo.params().items() if not p.requires_grad}
        lrs = {n: cast(p) for n, p in self._learned_lrs(rule_lr).items()}
        sx, sy, qx, qy = cast(batch.support.x), batch.support.y, cast(batch.query.x), batch.query.y
        T = batch.num_tasks
        g_theta, g_lrs, losses, outs = None, None, [], []
        with self._norms():
            for part in self._parts(T):
                (gt, gl), (loss, out) = fn(theta, lrs, frozen, sx[part], sy[part], qx[part], qy[part])
                g_theta = gt if g_theta is None else {n: g_theta[n] + gt[n] for n in gt}
                g_lrs = gl if g_lrs is None else {n: g_lrs[n] + gl[n] for n in gl}
                losses.append(loss.detach().reshape(-1))
                outs.append(out.detach() if self.vmap else out.detach().unsqueeze(0))
        grads = {**{n: g / T for n, g in g_theta.items()}, **{f"lr:{n}": g / T for n, g in g_lrs.items()}}
        return grads, torch.cat(losses), torch.cat(outs)

    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """Accumulate the meta-gradient of the mean query loss into `.grad` (model and learned lrs), as
        `Engine.meta_step`; returns {"loss": ..., <metric>: ...}. The first step at a new input is gated."""
        algo = self.algorithm
        if algo.query_weights() is not None:
            raise MetalearnError("outer.compile: not available with a multi-step query loss (MAML++); "
                                 "run without outer.compile")
        self._check_context(batch.support.x)
        key = self._step_key(batch)
        if self.compiled and key not in self._checked:
            grads, losses, outs = self._gated(
                "the meta-step", "meta-gradient", key, lambda c, d=None: self.meta_gradient(batch, compiled=c, dtype=d),
                lambda r: r[0], batch.support.x.dtype)
        else:
            grads, losses, outs = self.meta_gradient(batch, compiled=self.compiled)
        targets = {**{n: p for n, p in algo.params().items() if p.requires_grad},
                   **{f"lr:{n}": p for n, p in self._learned_lrs(algo.rule().lr).items()}}
        for n, p in targets.items():
            g = grads[n].to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
        T = batch.num_tasks
        score = sum(algo.score(outs[i], batch.query.y[i]).item() for i in range(T))
        return {"loss": losses.double().mean().item(), algo.metric_name: score / T}

    def query_outputs(self, batch: TaskBatch, steps: int, lr: Optional[float], *, compiled: bool = True,
                      dtype: Optional[torch.dtype] = None) -> Tensor:
        """Query outputs (T, Q, ...) of each task after a first-order adaptation of `steps` steps (test-time lr
        `lr`, as `Engine.evaluate_batch`), compiled or eager (dtype: as `meta_gradient`)."""
        algo = self.algorithm
        rule_lr = algo.rule(lr).lr
        fn = self._function(self._eval_key(batch, steps, lr), lambda: self._outputs_fn(steps, lr),
                            compiled and dtype is None)
        cast = _caster(dtype)
        params = {n: cast(p) for n, p in algo.params().items()}
        lrs = {n: cast(p) for n, p in self._learned_lrs(rule_lr).items()}
        sx, sy, qx = cast(batch.support.x), batch.support.y, cast(batch.query.x)
        with self._norms():
            outs = [fn(params, lrs, sx[part], sy[part], qx[part]).detach() for part in self._parts(batch.num_tasks)]
        return torch.cat(outs) if self.vmap else torch.stack(outs)

    def evaluate(self, batch: TaskBatch, steps: int, lr: Optional[float]) -> Tensor:
        """Query accuracy (or MSE) of each task after adaptation: (T,) float64, as `Engine.evaluate_batch`."""
        algo = self.algorithm
        self._check_context(batch.support.x)
        key = self._eval_key(batch, steps, lr)
        if self.compiled and key not in self._checked:
            outs = self._gated("evaluation's adaptation", "adapted query output", key,
                               lambda c, d=None: self.query_outputs(batch, steps, lr, compiled=c, dtype=d),
                               lambda r: {"out": r},
                               batch.support.x.dtype)
        else:
            outs = self.query_outputs(batch, steps, lr, compiled=self.compiled)
        return torch.stack([algo.score(outs[i], batch.query.y[i]) for i in range(batch.num_tasks)]).cpu()

    # --- the gate ------------------------------------------------------------------------------------------
    def _gated(self, what: str, quantity: str, key: Tuple, run: Callable[..., Any],
               compared: Callable[[Any], Dict[str, Tensor]], dtype: torch.dtype) -> Any:
        """run(True) (compiling it, with progress output), checked against run(False); its result, or a
        MetalearnError when the two differ by more than TOLERANCE[dtype] (float32: or than `tolerance` allows)."""
        how = "vmapped over tasks" if self.vmap else "one task at a time"
        self._say(f"compiling {what} with torch.compile ({how}; this takes minutes the first time; inductor "
                  f"caches it under {cache_dir()})")
        t0 = time.perf_counter()
        result = run(True)
        self._say(f"compiled {what} in {time.perf_counter() - t0:.1f} s; checking it against the eager one")
        eager = run(False)
        reference = compared(eager)
        if not _finite(reference):
            return eager  # nothing to compare; not marked as checked (the training loop reports non-finite values)
        distance, tol = relative_l2(compared(result), reference), TOLERANCE[dtype]
        if not distance <= tol and dtype != torch.float64 and distance == distance:
            tol = self._tolerance(reference, lambda: compared(run(False, torch.float64)), tol)
        if not distance <= tol:  # NaN fails too
            raise MetalearnError(f"outer.compile: the compiled {quantity} is {distance:.3g} from the eager one on "
                                 f"this model (tolerance {tol:g}); run without outer.compile")
        self._checked[key] = distance
        self._say(f"compiled {what} agrees with the eager one (relative L2 distance {distance:.1e})")
        return result


    def _tolerance(self, reference: Dict[str, Tensor], exact: Callable[[], Dict[str, Tensor]], tol: float) -> float:
        """float32 beyond TOLERANCE: how far float32 rounding alone moves the eager result on this model and batch
        (its distance to the same computation in float64) sets the bound: max(tol, ROUNDING_FACTOR * that)."""
        try:
            rounding = relative_l2(reference, exact())
        except (RuntimeError, TypeError):  # a model that cannot run in float64 (a float32 buffer): the fixed bound
            return tol
        self._say(f"float32 rounding alone moves the eager result {rounding:.1e} from float64 here")
        return max(tol, ROUNDING_FACTOR * rounding)


def _caster(dtype: Optional[torch.dtype]) -> Callable[[Tensor], Tensor]:
    return (lambda t: t.detach()) if dtype is None else (lambda t: t.detach().to(dtype))


def _static_lr(lr: Any) -> Any:
    """An lr spec as part of a function's static key: the float, or the learned-lr table's type."""
    return type(lr).__name__ if isinstance(lr, _LRTable) else float(lr)


__all__ = ["TOLERANCE", "CompiledMetaStep", "cache_dir", "check_config", "check_supported", "relative_l2",
           "unsupported"]
