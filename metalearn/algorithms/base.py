"""What every algorithm shares: the loss (classification or regression), metrics, the outer
optimiser and schedule hooks, per-task meta-steps, and transductive or non-transductive scoring.

An algorithm object holds the model (whose parameters are the meta-parameters theta) and,
for some algorithms, extra learnables (Meta-SGD's alpha, MAML++'s per-step lrs) returned by
`meta_parameters()` and saved with `state_dict()`. The training loop calls, per outer step:

    algorithm.schedule(step, total_steps, optimizer)   # annealing (Reptile's epsilon, MAML++)
    algorithm.meta_step(batch)                         # accumulates .grad, returns metrics
    optimizer.step()                                   # optimizer = algorithm.outer_optimizer(...)

BatchNorm policy at scoring time (`transductive`):
    True   the query set is one batch, so BatchNorm normalises with the query batch's statistics
           (MAML's and Reptile's transductive setting);
    False  each query example is scored alone in a batch with the support set
           (support + 1 example), so no query example sees another's statistics (Reptile's
           non-transductive setting, Nichol et al. 2018, Sec. 6).
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import EXECUTIONS
from ..errors import MetalearnError
from ..inner import forward, run_inner_loop, select
from ..inner.batched import batched_forward, batched_inner_loop, task_losses, task_metrics
from ..inner.layout import channels_last
from ..inner.rules import LRSpec
from ..types import Examples, Params, TaskBatch

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
# hybrid on CPU: support tasks adapted together in chunks whose first-layer activations stay under
# this many elements (16 MB in float32). Larger tensors exceed glibc's largest heap block (32 MB),
# are mmap-ed afresh on every allocation and page-fault on every use (measured: a 32 MB multiply
# took 46 ms where 16 MB ones took 0.8 ms).
HYBRID_CHUNK_ELEMENTS = 4 * 2**20
METRICS = {"cross_entropy": "accuracy", "mse": "mse"}


def metric(outputs: Tensor, y: Tensor, loss: str) -> Tensor:
    """Accuracy of logits (B, N) against labels (B,), or the mean squared error of (B, 1) regressions."""
    if loss == "mse":
        return F.mse_loss(outputs, y).double()
    return (outputs.argmax(-1) == y).double().mean()


def scored(predict_one, support_x: Tensor, query_x: Tensor, transductive: bool) -> Tensor:
    """Outputs on the query set (Q', ...) with `predict_one(x)` = the model on a batch x.

    transductive: predict_one(query_x); otherwise row j = predict_one(cat(support_x, query_x[j]))[-1].
    """
    if transductive:
        return predict_one(query_x)
    return torch.stack([predict_one(torch.cat([support_x, query_x[j:j + 1]]))[-1] for j in range(len(query_x))])


class MetaLearner:
    """Base class: loss, metric name, outer optimiser, schedule hook, extra learnables."""

    has_inner_loop = True
    """False for algorithms that adapt without inner steps (ProtoNet); results then print no steps."""
    on_episode = None
    """Set by evaluation.evaluate while a progress bar is shown: called after each episode is scored."""

    def episode_done(self) -> None:
        """Per-task evaluation loops call this after each episode (the evaluation bar moves per episode)."""
        if self.on_episode is not None:
            self.on_episode()

    def __init__(self, model: nn.Module, *, loss: str = "cross_entropy"):
        if loss not in LOSSES:
            raise MetalearnError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.model, self.loss = model, loss
        self.loss_fn = LOSSES[loss]
        self.metric_name = METRICS[loss]

    def params(self) -> Params:
        return dict(self.model.named_parameters())

    default_adapt: Sequence[str] = ("*",)
    """The inner mask when inner.adapt is left at its default."""

    @classmethod
    def configured_adapt(cls, cfg) -> List[str]:
        """inner.adapt, or this algorithm's default mask when the config leaves it at the default."""
        adapt = cfg.inner.adapt
        if adapt is None or (list(adapt) == ["*"] and tuple(cls.default_adapt) != ("*",)):
            return list(cls.default_adapt)
        return list(adapt)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Settings this algorithm's declared capabilities rule out (one-line errors, before any work)."""
        from .registry import supporting

        name = cfg.outer.algorithm
        if cfg.inner.checkpoint and not cls.capabilities.inner_checkpoint:
            raise MetalearnError(f"inner.checkpoint: not available for {name} "
                                 f"({', '.join(supporting('inner_checkpoint'))} only)")

    @classmethod
    def from_config(cls, cfg, model: nn.Module, loss: str = "cross_entropy") -> "MetaLearner":
        """The algorithm configured from a Config (metalearn/config.py) on `model`."""
        cls.check_config(cfg)
        algorithm = cls(model, loss=loss)
        algorithm.lr_halve_every = cfg.outer.lr_halve_every
        return algorithm

    def meta_parameters(self) -> List[nn.Parameter]:
        """Learnables besides the model's parameters (trained by the outer loop)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise MetalearnError(f"{type(self).__name__} has no state to load, got keys {sorted(state)}")

    lr_halve_every: int = 0
    """Step decay of the outer lr: halved every this many outer steps (0 = constant; Snell et al.'s
    ProtoNet schedule halves Adam's lr every 2000 episodes). Set by train.build_algorithm."""

    def outer_optimizer(self, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
        """Adam over the trained model parameters and the algorithm's own learnables."""
        self.initial_lr = lr
        return torch.optim.Adam(list(params) + self.meta_parameters(), lr=lr)

    def schedule(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before outer step `step` (1-based) of `total_steps`; annealing goes here.

        The default: lr = outer.lr * 0.5 ** ((step - 1) // lr_halve_every), a function of the step
        alone, so a resumed run follows the same schedule. Algorithms with a schedule of their own
        (reptile, mamlpp) override this."""
        if self.lr_halve_every:
            lr = self.initial_lr * 0.5 ** ((step - 1) // self.lr_halve_every)
            for group in optimizer.param_groups:
                group["lr"] = lr


class GradientMetaLearner(MetaLearner):
    """MAML-family learner: masks, lr spec, S inner steps, first or second order.

    Execution (`execution`, set with `set_execution`):
      loop     the reference: a per-task loop; each task's query loss / T is backpropagated before
               the next task is adapted, so memory holds one task's graph at a time and the
               accumulated gradient equals the gradient of the mean.
      batched  all tasks (or `task_chunk` at a time) adapted at once with a task dimension
               (metalearn/inner/batched.py): the same meta-gradient to float rounding, much less
               per-operator overhead. For algorithms that keep the default inner loop (SGD with a
               float / per-tensor / per-element lr, the plain forward) on conv4 or mlp, and for those
               that override `_batched_support` and `_batched_query_outputs` (ANIL).
      hybrid   support sets adapted batched (as above, `task_chunk` tasks at a time), then each task's
               query loss differentiated on its own at detached adapted parameters theta'_t with
               ordinary convolutions on channels-last images (CPU), and the stacked query gradients
               pushed back through the batched support graph in one backward. The same meta-gradient
               (d L_q / d theta = (d theta' / d theta)^T d L_q / d theta'): the small support passes
               lose their per-task overhead, the large query passes keep the loop's cache locality.
               For the algorithms batched supports that batch no query pass of their own (not ANIL).
      auto     on CUDA: batched; on CPU: batched for the MLP, hybrid for conv4 (measured fastest,
               benchmarks/results/meta_step_cpu.json); else loop. `execution_plan()` says which and why.
    (No torch.func.vmap: vmap through BatchNorm gives a wrong second-order meta-gradient.)
    """

    execution: str = "auto"
    task_chunk: int = 0
    checkpoint: bool = False  # inner-loop activation checkpointing (see set_execution)

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("*",), loss: str = "cross_entropy"):
        super().__init__(model, loss=loss)
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.adapt = select([n for n, _ in model.named_parameters()], adapt, what="inner.adapt")

    @classmethod
    def from_config(cls, cfg, model: nn.Module, loss: str = "cross_entropy") -> "GradientMetaLearner":
        cls.check_config(cfg)
        algorithm = cls(model, **cls.config_kwargs(cfg), loss=loss)
        if not cls.capabilities.own_lr_schedule:
            algorithm.lr_halve_every = cfg.outer.lr_halve_every
        algorithm.set_execution(cfg.outer.execution, cfg.outer.task_chunk, checkpoint=cfg.inner.checkpoint)
        if cfg.inner.lora_rank:  # the inner loop adapts LoRA deltas (metalearn/inner/lora.py)
            algorithm.use_lora(cfg.inner.lora_rank, cfg.inner.lora_alpha)
            from ..inner.lora import adapted_size

            full = adapted_size(algorithm.params(), algorithm.adapt)
            low = adapted_size(algorithm.params(), algorithm.lora_full, algorithm.lora)
            print(f"LoRA rank {cfg.inner.lora_rank}: the inner loop adapts {low['parameters']} entries per task "
                  f"({low['bytes']} bytes) instead of {full['parameters']}", file=sys.stderr)
        return algorithm

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        """Constructor arguments read from the config (subclasses add their own keys)."""
        return dict(inner_lr=cfg.inner.lr, inner_steps=cfg.inner.steps, first_order=cfg.inner.first_order,
                    adapt=cls.configured_adapt(cfg))

    # --- hooks subclasses override --------------------------------------------------------
    def lr_spec(self, lr: Optional[float] = None) -> LRSpec:
        """The inner lr spec; `lr` (a test-time override) replaces a scalar inner lr."""
        return self.inner_lr if lr is None else lr

    def forward_fn(self, params: Params, x: Tensor, step: int) -> Tensor:
        """The model at `params` on a batch x; `step` = the inner step (for per-step BatchNorm)."""
        return forward(self.model, params, x)

    def adapt_task(self, params: Params, support: Examples, *, steps: Optional[int] = None,
                   lr: Optional[float] = None, first_order: Optional[bool] = None) -> Params:
        adapt, forward_fn = self.adapt, self.forward_fn
        if self.lora is not None:  # LoRA (use_lora): adapt zero-started rank-r deltas instead of the weights
            params = {**params, **{n: d.requires_grad_(True) for n, d in self.lora.init(support.x).items()}}
            adapt = self.lora_full + self.lora.delta_names
            forward_fn = lambda p, x, s: self.forward_fn(self.lora.merge(p), x, s)  # noqa: E731
        fast = run_inner_loop(self.model, params, support, adapt=adapt, lr=self.lr_spec(lr),
                              steps=self.inner_steps if steps is None else steps,
                              first_order=self.first_order if first_order is None else first_order,
                              loss_fn=self.loss_fn, forward_fn=forward_fn, checkpoint=self.checkpoint).params
        return self.lora.merge(fast) if self.lora is not None else fast

    # --- LoRA inner loop (metalearn/inner/lora.py) ----------------------------------------------
    lora = None
    lora_full: List[str] = []

    def use_lora(self, rank: int, alpha: float = 0.0, seed: int = 0) -> "GradientMetaLearner":
        """Adapt each selected weight with >= 2 dims through a rank-`rank` delta (B zero at every task's
        start, A fixed by `seed`); selected 1-dim tensors (biases, BatchNorm) still adapt in full.
        Only for algorithms that keep the default adapt_task (MAML, FOMAML); runs the per-task loop."""
        from ..inner.lora import LoRA, lora_targets

        if type(self).adapt_task is not GradientMetaLearner.adapt_task:
            raise MetalearnError(f"LoRA inner loop: {type(self).__name__} has its own adapt_task")
        params = self.params()
        low, self.lora_full = lora_targets(params, self.adapt)
        if not low:
            raise MetalearnError("inner.lora_rank: inner.adapt selects no weight with >= 2 dims")
        self.lora = LoRA(params, low, rank, alpha, seed)
        return self

    def task_loss(self, params: Params, batch: TaskBatch, i: int) -> tuple[Tensor, Tensor]:
        """(query loss of task i after adaptation, query outputs)."""
        fast = self.adapt_task(params, batch.support.task(i))
        out = self.forward_fn(fast, batch.query.x[i], max(self.inner_steps - 1, 0))
        return self.loss_fn(out, batch.query.y[i]), out

    # --- execution: per-task loop or batched --------------------------------------------------
    def set_execution(self, mode: str = "auto", task_chunk: int = 0, checkpoint: bool = False) -> "GradientMetaLearner":
        """mode: see the class docstring; task_chunk: tasks adapted at once by batched/hybrid (0 = all);
        checkpoint: recompute each inner step's activations in the outer backward instead of keeping
        them (second order: memory flat in the number of inner steps, about one more support forward
        and backward per step; the same meta-gradient)."""
        if checkpoint and type(self).task_loss is not GradientMetaLearner.task_loss:
            raise MetalearnError(f"inner.checkpoint: {type(self).__name__} runs its own inner loop; "
                                 "supported: maml, fomaml, boil, metasgd")
        self.checkpoint = checkpoint
        if mode not in EXECUTIONS:
            raise MetalearnError(f"execution must be one of {', '.join(EXECUTIONS)}, got {mode!r}")
        if task_chunk < 0:
            raise MetalearnError(f"task_chunk must be >= 0, got {task_chunk}")
        self.execution, self.task_chunk = mode, task_chunk
        if mode in ("batched", "hybrid"):
            ok, why = self._hybrid_support() if mode == "hybrid" else self._batched_support()
            if not ok:
                raise MetalearnError(f"execution={mode} is not available: {why}; use execution=loop or auto")
        return self

    def _hybrid_support(self) -> "tuple[bool, str]":
        ok, why = self._batched_support()
        if ok and type(self)._batched_query_outputs is not GradientMetaLearner._batched_query_outputs:
            return False, f"{type(self).__name__} batches its query pass itself (use batched)"
        return ok, why

    def _batched_support(self) -> "tuple[bool, str]":
        """(can the batched path run this algorithm and model, why not)."""
        base = GradientMetaLearner
        for hook in ("task_loss", "adapt_task", "forward_fn", "meta_step", "evaluate_batch"):
            if getattr(type(self), hook) is not getattr(base, hook):
                return False, f"{type(self).__name__} overrides {hook}"
        if batched_forward(self.model) is None:
            return False, f"no batched forward for model {type(self.model).__name__}"
        if self.lora is not None:
            return False, "LoRA inner loop (use_lora) runs per task"
        return True, ""

    def execution_plan(self) -> "tuple[str, str]":
        """("loop" | "batched" | "hybrid", a one-line reason) for the current `execution` setting.

        auto picks batched on CUDA; on CPU batched for the MLP (one small MLP per task is all
        per-operator overhead) and hybrid for conv4, whose large query passes run faster one task
        at a time with their activations in cache (benchmarks/results/meta_step_cpu.json).
        """
        if self.execution == "loop":
            return "loop", "execution=loop"
        ok, why = self._batched_support()
        if not ok:
            return "loop", f"batched path unavailable ({why})"
        chunk = f", {self.task_chunk} tasks at a time" if self.task_chunk else ""
        hybrid = "hybrid", f"support sets batched{chunk}, query sets one task at a time"
        if self.execution == "hybrid":
            return hybrid
        if self.execution == "auto":
            device = next(self.model.parameters()).device
            if device.type == "cpu" and type(self.model).__name__ != "MLP":
                if self._hybrid_support()[0]:
                    return hybrid[0], f"auto on CPU with {type(self.model).__name__}: {hybrid[1]}"
                return "loop", f"auto on CPU with {type(self.model).__name__}: the per-task loop is faster there"
        return "batched", f"tasks as a batch dimension{chunk}"

    def _batched(self) -> bool:
        return self.execution_plan()[0] == "batched"

    def _chunks(self, T: int, size: int = 0) -> "list[slice]":
        size = size or self.task_chunk or T
        return [slice(lo, min(T, lo + size)) for lo in range(0, T, size)]

    # --- hybrid: batched support sets, per-task query sets ------------------------------------
    def _hybrid_chunks(self, batch: TaskBatch) -> "list[slice]":
        T = batch.num_tasks
        if self.task_chunk or batch.support.x.device.type != "cpu" or batch.support.x.dim() < 5:
            return self._chunks(T)
        first = getattr(getattr(self.model, "features", [None])[0], "conv", None)
        width = first.out_channels if isinstance(first, nn.Conv2d) else batch.support.x.shape[2]
        per_task = batch.support.x[0].numel() // batch.support.x.shape[2] * width
        return self._chunks(T, max(1, min(T, HYBRID_CHUNK_ELEMENTS // max(per_task, 1))))

    def _adapt_tasks(self, params: Params, batch: TaskBatch, sl: slice, *, steps: int, lr: LRSpec,
                     first_order: bool) -> Params:
        """Tasks `sl` adapted together on their support sets (batched inner loop): the adapted names
        come back as (Tc, *shape), the others shared."""
        sup_x = batch.support.x[sl]
        return batched_inner_loop(batched_forward(self.model), params, sup_x, batch.support.y[sl], adapt=self.adapt,
                                  lr=lr, steps=steps, first_order=first_order, loss=self.loss,
                                  num_tasks=sup_x.shape[0], checkpoint=self.checkpoint)

    @staticmethod
    def _query_images(x: Tensor) -> Tensor:
        return channels_last(x) if x.device.type == "cpu" and x.dim() >= 5 else x

    def _hybrid_meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """meta_step with batched support sets and per-task query sets (see the class docstring)."""
        params, T = self.params(), batch.num_tasks
        query_x, last = self._query_images(batch.query.x), max(self.inner_steps - 1, 0)
        total_loss, total_metric = 0.0, 0.0
        for sl in self._hybrid_chunks(batch):
            fast = self._adapt_tasks(params, batch, sl, steps=self.inner_steps, lr=self.lr_spec(),
                                     first_order=self.first_order)
            names = [n for n in self.adapt if fast[n].requires_grad]
            vjp = {n: torch.zeros_like(fast[n]) for n in names}
            for j, i in enumerate(range(sl.start, sl.stop)):
                leaves = {n: fast[n][j].detach().requires_grad_() for n in self.adapt}
                out = self.forward_fn({**params, **leaves}, query_x[i], last)
                loss = self.loss_fn(out, batch.query.y[i])
                (loss / T).backward()  # shared (non-adapted) parameters get their direct gradient here
                for n in names:
                    if leaves[n].grad is not None:
                        vjp[n][j] = leaves[n].grad
                total_loss += loss.item()
                total_metric += metric(out.detach(), batch.query.y[i], self.loss).item()
            if names:  # through the support graph: theta, and learnables such as Meta-SGD's alpha
                torch.autograd.backward([fast[n] for n in names], [vjp[n] for n in names])
        return {"loss": total_loss / T, self.metric_name: total_metric / T}

    def _hybrid_evaluate(self, batch: TaskBatch, steps: int, lr: Optional[float]) -> Tensor:
        params = {n: p.detach().requires_grad_(n in self.adapt) for n, p in self.params().items()}
        query_x, last, out = self._query_images(batch.query.x), max(steps - 1, 0), []
        for sl in self._hybrid_chunks(batch):
            fast = self._adapt_tasks(params, batch, sl, steps=steps, lr=self.lr_spec(lr), first_order=True)
            for j, i in enumerate(range(sl.start, sl.stop)):
                task = {**params, **{n: fast[n][j].detach() for n in self.adapt}}
                out.append(metric(self.forward_fn(task, query_x[i], last), batch.query.y[i], self.loss))
        return torch.stack(out).cpu()

    def _batched_query_outputs(self, params: Params, batch: TaskBatch, sl: slice, *, steps: int, lr: LRSpec,
                               first_order: bool) -> Tensor:
        """Query outputs (Tc, Q, ...) of tasks `sl`, each adapted on its support set, all at once."""
        fast = self._adapt_tasks(params, batch, sl, steps=steps, lr=lr, first_order=first_order)
        return batched_forward(self.model)(fast, batch.query.x[sl])

    def _batched_meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """meta_step with all tasks of a chunk adapted at once (see metalearn/inner/batched.py)."""
        params, T = self.params(), batch.num_tasks
        losses, metrics = [], []
        for sl in self._chunks(T):
            out = self._batched_query_outputs(params, batch, sl, steps=self.inner_steps, lr=self.lr_spec(),
                                              first_order=self.first_order)
            loss = task_losses(out, batch.query.y[sl], self.loss)  # (Tc,)
            (loss.sum() / T).backward()
            losses.append(loss.detach())
            metrics.append(task_metrics(out.detach(), batch.query.y[sl], self.loss))
        return {"loss": torch.cat(losses).double().mean().item(), self.metric_name: torch.cat(metrics).mean().item()}

    def _batched_evaluate(self, batch: TaskBatch, steps: int, lr: Optional[float]) -> Tensor:
        params = {n: p.detach().requires_grad_(n in self.adapt) for n, p in self.params().items()}
        out = [task_metrics(self._batched_query_outputs(params, batch, sl, steps=steps, lr=self.lr_spec(lr),
                                                        first_order=True).detach(), batch.query.y[sl], self.loss)
               for sl in self._chunks(batch.num_tasks)]
        return torch.cat(out).cpu()

    # --- the two entry points ---------------------------------------------------------------
    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """Accumulate the meta-gradient of the mean query loss into `.grad` (model and meta_parameters()).

        Returns the mean query loss and accuracy (or MSE) of the adapted models (before the outer step).
        """
        plan = self.execution_plan()[0]
        if plan == "batched":
            return self._batched_meta_step(batch)
        if plan == "hybrid":
            return self._hybrid_meta_step(batch)
        params = self.params()
        total_loss, total_metric, T = 0.0, 0.0, batch.num_tasks
        for i in range(T):
            loss, out = self.task_loss(params, batch, i)
            (loss / T).backward()
            total_loss += loss.item()
            total_metric += metric(out.detach(), batch.query.y[i], self.loss).item()
        return {"loss": total_loss / T, self.metric_name: total_metric / T}

    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        """Query accuracy (or MSE) of each task after adapting on its support set: (T,) float64."""
        steps = self.inner_steps if steps is None else steps
        plan = self.execution_plan()[0] if transductive else "loop"
        if plan == "batched":
            return self._batched_evaluate(batch, steps, lr)
        if plan == "hybrid":
            return self._hybrid_evaluate(batch, steps, lr)
        params = {n: p.detach().requires_grad_(n in self.adapt) for n, p in self.params().items()}
        out = []
        for i in range(batch.num_tasks):
            fast = self.adapt_task(params, batch.support.task(i), steps=steps, lr=lr, first_order=True)
            fast = {n: p.detach() for n, p in fast.items()}
            pred = scored(lambda x: self.forward_fn(fast, x, max(steps - 1, 0)), batch.support.x[i],
                          batch.query.x[i], transductive)
            out.append(metric(pred, batch.query.y[i], self.loss))
            self.episode_done()
        return torch.stack(out).cpu()
