"""The engine: how a meta-batch is executed. Algorithms (metalearn/algorithms/) say what they are;
this module runs them, once for all of them.

    learner = Engine(MAML(model, inner_lr=0.4, inner_steps=1), execution="auto")
    metrics = learner.meta_step(batch)           # accumulates the meta-gradient into .grad
    scores  = learner.evaluate_batch(batch)      # (T,) query accuracy (or MSE) after adaptation

An `Engine` is the `MetaLearner` the training loop, evaluation and the CLI hold (the Protocol in
metalearn/types.py): it adds the execution to an algorithm and passes everything else through
(model, learnables, schedule, optimiser, state).

Execution paths for a GradientMetaLearner (chosen by `execution` and the algorithm's declared
capabilities; `plan()` says which and why). The meta-gradient is the gradient of the mean query
loss (1/T) sum_t L_Q_t(theta'_t) in each, equal to float rounding (tests/test_batched.py checks
them against each other and tests/reference.py in float64 to 1e-10, BatchNorm on):

  loop     the reference: one task after another; each task's query loss / T is backpropagated
           before the next task is adapted, so memory holds one task's graph at a time.
  batched  all tasks (or `task_chunk` at a time) adapted at once with a task dimension: the inner
           loop is the same `metalearn.inner.adapt` with tasks=T over the model run on all tasks at
           once (metalearn/inner/batched.py): `torch.func.vmap` over tasks of the algorithm's own
           forward, for any nn.Module, or a hand-written twin (grouped convolutions, batched
           matmuls) for conv4 and the MLP where that is measured faster; per-operator overhead is
           paid once per chunk instead of once per task.
  hybrid   support sets adapted batched (as above), then each task's query loss differentiated on
           its own at detached adapted parameters theta'_t with ordinary convolutions on
           channels-last images (CPU), and the stacked query gradients pushed back through the
           batched support graph in one backward: (d L_q / d theta) = (d theta' / d theta)^T d L_q / d theta'.
           The small support passes lose their per-task overhead, the large query passes keep the
           loop's cache locality. On a CPU the support tasks are batched in chunks sized by their
           first-layer activations (HYBRID_CHUNK_ELEMENTS); where one task fills a chunk (ResNet-12 or
           conv4 at 84x84), it adapts with its own forward, as in the loop, without vmap. conv4's first
           block runs from patch statistics in both passes on a CPU (metalearn/models/stem.py).
  auto     on CUDA: batched; on a CPU: batched for the MLP, hybrid for image models (measured
           fastest, benchmarks/results/meta_step_cpu.json); the loop where neither applies.
  compiled (`compile=True`, outer.compile) the meta-step as one torch.func function run through
           torch.compile (metalearn/compiled.py), vmapped where the plan would be batched, else per
           task; checked against its eager twin on each new input shape and refused where it differs.

Algorithms with their own per-task step (Reptile's parameter difference, ProtoNet's prototypes,
the fine-tuning adapter) run as they are: their plan is always the loop.

BatchNorm in every path follows metalearn/inner/norm.py: batch statistics, running statistics never
read or written (so no episode depends on the ones before it); under vmap it runs in a form whose
second derivatives are exact. Evaluation runs the model in eval mode (Dropout and DropBlock off).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .algorithms.base import GradientMetaLearner, scored
from .compiled import CompiledMetaStep
from .errors import MetalearnError
from .inner import adapt
from .inner.batched import BatchedForward, batched_features, batched_forward, batched_head, task_vmap
from .inner.layout import channels_last
from .inner.norm import first_order_norms
from .types import Params, TaskBatch

EXECUTIONS = ("auto", "loop", "batched", "hybrid")

HYBRID_CHUNK_ELEMENTS = 4 * 2**20
"""hybrid on CPU: support tasks adapted together in chunks whose first-layer activations stay under this
many elements (16 MB in float32). Larger tensors exceed glibc's largest heap block (32 MB), are mmap-ed
afresh on every allocation and page-fault on every use (measured: a 32 MB multiply took 46 ms where
16 MB ones took 0.8 ms)."""

AUTO_CUDA_HYBRID_PARAMETERS = 10**6
"""auto on CUDA: hybrid for models with at least this many parameters, batched below. On the H200
(benchmarks/results/meta_step_h200*.json) batched won for every model of 0.11M parameters or fewer
(conv4, the sinusoid MLP, the user model: 1.1-3.9x faster than hybrid) and lost for ResNet-12 (12.4M):
253 against 201 ms at 1 step, 711 against 658 at 5 steps, with 1.3-1.8x hybrid's memory. Each of its
tasks is a large batch of convolutions already, and batching them did not pay (not profiled on the GPU).
No model between the two sizes was measured: the threshold is a round number between them."""


class Engine:
    """An algorithm, executed: per-task loop, batched or hybrid (see the module docstring).

    execution: auto | loop | batched | hybrid; task_chunk: tasks adapted at once by batched/hybrid
    (0 = all; hybrid on a CPU: chunks sized to keep activations in glibc's heap); twin: the batched
    path runs conv4 and the MLP through their hand-written batched twins (False: through vmap like any
    other model, as hybrid's support pass always does; the two agree to float rounding,
    tests/test_generic_batched.py); compile: run the meta-step and evaluation's adaptation as
    torch.compile'd torch.func functions (metalearn/compiled.py: vmapped over tasks where the plan would
    be batched, else one task at a time; checked against the eager ones on each new input shape). A mode
    the algorithm cannot run is refused here, with the reason.
    """

    def __init__(self, algorithm: Any, execution: str = "auto", task_chunk: int = 0, twin: bool = True,
                 compile: bool = False):
        if execution not in EXECUTIONS:
            raise MetalearnError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
        if task_chunk < 0:
            raise MetalearnError(f"task_chunk must be >= 0, got {task_chunk}")
        self.algorithm, self.execution, self.task_chunk, self.twin = algorithm, execution, task_chunk, twin
        self._on_episode: Optional[Callable[[], None]] = None
        if execution in ("batched", "hybrid") and isinstance(algorithm, GradientMetaLearner):
            ok, why = self._hybrid_support() if execution == "hybrid" else self._batched_support()
            if not ok:
                raise MetalearnError(f"execution={execution} is not available: {why}; use execution=loop or auto")
        self.compiled: Optional[CompiledMetaStep] = None
        if compile:  # refused here for what it does not support
            self.compiled = CompiledMetaStep(algorithm, vmap=self.plan()[0] == "batched", chunk=task_chunk)

    # --- the algorithm, passed through -------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """Anything else is the algorithm's (model, capabilities, adapt, inner_steps, take_support, ...)."""
        if name == "algorithm":  # not yet set (during unpickling)
            raise AttributeError(name)
        return getattr(self.algorithm, name)

    @property
    def on_episode(self) -> Optional[Callable[[], None]]:
        """Set by evaluation.evaluate while a progress bar is shown: called after each episode is scored."""
        return self._on_episode

    @on_episode.setter
    def on_episode(self, fn: Optional[Callable[[], None]]) -> None:
        self._on_episode = fn
        self.algorithm.on_episode = fn  # algorithms with their own per-task evaluation call it themselves

    def _episode_done(self) -> None:
        if self._on_episode is not None:
            self._on_episode()

    def params(self) -> Params:
        return self.algorithm.params()

    def meta_parameters(self) -> List[nn.Parameter]:
        return self.algorithm.meta_parameters()

    def outer_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return self.algorithm.outer_optimizer(params, lr)

    def schedule(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        self.algorithm.schedule(step, total_steps, optimizer)

    def state_dict(self) -> dict:
        return self.algorithm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state)

    # --- which path ----------------------------------------------------------------------------
    def _batched_support(self) -> "tuple[bool, str]":
        """(can the batched path run this algorithm and model, why not)."""
        algo = self.algorithm
        name = type(algo).__name__
        if not algo.capabilities.batchable:
            return False, getattr(algo, "per_task_reason", f"{name} runs per task (it declares no batched path)")
        if algo.lora is not None:
            return False, "LoRA inner loop (use_lora) runs per task"
        return True, ""

    def _hybrid_support(self) -> "tuple[bool, str]":
        ok, why = self._batched_support()
        if ok and not self.algorithm.capabilities.hybrid:
            return False, f"{type(self.algorithm).__name__} batches its query pass itself (use batched)"
        return ok, why

    def plan(self) -> "tuple[str, str]":
        """("loop" | "batched" | "hybrid" | "compiled", a one-line reason) for the current `execution` setting.

        auto picks batched on CUDA, except hybrid for models of AUTO_CUDA_HYBRID_PARAMETERS parameters or
        more (ResNet-12); on CPU batched for the MLP (one small MLP per task is all
        per-operator overhead) and hybrid for image models (conv4, ResNet-12, your own), whose large
        query passes run faster one task at a time with their activations in cache
        (benchmarks/results/meta_step_cpu.json).
        """
        algo = self.algorithm
        if not isinstance(algo, GradientMetaLearner):
            return "loop", f"{type(algo).__name__} runs its own per-task step"
        if getattr(self, "compiled", None) is not None:
            how = "all tasks at once (vmap)" if self.compiled.vmap else "one task at a time"
            return "compiled", f"torch.compile of the torch.func meta-step, {how}"
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
            device = next(algo.model.parameters()).device
            name = type(algo.model).__name__
            if device.type == "cpu" and name != "MLP":
                if self._hybrid_support()[0]:
                    return hybrid[0], f"auto on CPU with {name}: {hybrid[1]}"
                return "loop", f"auto on CPU with {name}: the per-task loop is faster there"
            size = sum(p.numel() for p in algo.model.parameters()) if device.type != "cpu" else 0
            if size >= AUTO_CUDA_HYBRID_PARAMETERS and self._hybrid_support()[0]:
                return hybrid[0], (f"auto on {device.type} with {name} ({size / 1e6:.1f}M parameters; from "
                                   f"{AUTO_CUDA_HYBRID_PARAMETERS / 1e6:g}M hybrid, which ran ResNet-12 faster than "
                                   f"batched on an H200): {hybrid[1]}")
        return "batched", f"tasks as a batch dimension{chunk}"

    execution_plan = plan

    def _chunks(self, T: int, size: int = 0) -> "list[slice]":
        size = size or self.task_chunk or T
        return [slice(lo, min(T, lo + size)) for lo in range(0, T, size)]

    def _hybrid_chunks(self, batch: TaskBatch) -> "list[slice]":
        T = batch.num_tasks
        if self.task_chunk or batch.support.x.device.type != "cpu" or batch.support.x.dim() < 5:
            return self._chunks(T)
        model = self.algorithm.model
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        width = first.out_channels if first is not None else batch.support.x.shape[2]
        per_task = batch.support.x[0].numel() // batch.support.x.shape[2] * width
        return self._chunks(T, max(1, min(T, HYBRID_CHUNK_ELEMENTS // max(per_task, 1))))

    # --- the two entry points ---------------------------------------------------------------
    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """Accumulate the meta-gradient of the mean query loss into `.grad` (model and meta_parameters()).

        Returns the mean query loss and accuracy (or MSE) of the adapted models (before the outer step).
        """
        algo = self.algorithm
        if not isinstance(algo, GradientMetaLearner):
            if not algo.capabilities.meta_trained:
                raise MetalearnError(f"{type(algo).__name__} is not meta-trained (an evaluation-time adapter): "
                                     "pre-train with `metalearn pretrain CONFIG`, then evaluate")
            return algo.meta_step(batch)
        mode = self.plan()[0]
        if mode == "compiled":
            return self.compiled.meta_step(batch)
        if mode == "batched":
            return self._batched_meta_step(batch)
        if mode == "hybrid":
            return self._hybrid_meta_step(batch)
        return self._loop_meta_step(batch)

    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        """Query accuracy (or MSE) of each task after adapting on its support set: (T,) float64."""
        algo = self.algorithm
        with _eval_mode(algo.model):
            if not isinstance(algo, GradientMetaLearner):
                return algo.evaluate_batch(batch, steps=steps, lr=lr, transductive=transductive)
            return self._evaluate(batch, steps, lr, transductive)

    def _evaluate(self, batch: TaskBatch, steps: Optional[int], lr: Optional[float], transductive: bool) -> Tensor:
        algo = self.algorithm
        steps = algo.inner_steps if steps is None else steps
        mode = self.plan()[0] if transductive else "loop"
        with algo.evaluating():
            if mode == "compiled":
                return self.compiled.evaluate(batch, steps, lr)
            if mode == "batched":
                return self._batched_evaluate(batch, steps, lr)
            if mode == "hybrid":
                return self._hybrid_evaluate(batch, steps, lr)
            return self._loop_evaluate(batch, steps, lr, transductive)

    # --- the per-task loop: the reference ---------------------------------------------------------
    def _adapt_task(self, params: Params, x: Tensor, y: Tensor, *, steps: int, lr: Optional[float],
                    first_order: bool, forward_fn=None, trajectory: bool = False):
        """One task's inner loop on its support set (x, y): the InnerResult, LoRA deltas merged."""
        algo = self.algorithm
        names, fwd = algo.adapt, forward_fn or algo.forward_fn
        if algo.lora is not None:  # adapt zero-started rank-r deltas instead of the weights
            lora = algo.lora
            params = {**params, **{n: d.requires_grad_(True) for n, d in lora.init(x).items()}}
            names = algo.lora_full + lora.delta_names
            base_fwd = fwd
            fwd = lambda p, x_, s: base_fwd(lora.merge(p), x_, s)  # noqa: E731
        res = adapt(fwd, params, x, y, names=names, rule=algo.rule(lr), steps=steps, first_order=first_order,
                    loss_fn=algo.loss_fn, trajectory=trajectory, checkpoint=algo.inner_checkpoint)
        if algo.lora is not None:
            res.params = algo.lora.merge(res.params)
        return res

    def _task_loss(self, params: Params, batch: TaskBatch, i: int) -> "tuple[Tensor, Tensor]":
        """(query loss of task i after adaptation, query outputs)."""
        algo = self.algorithm
        S, qx, qy = algo.inner_steps, batch.query.x[i], batch.query.y[i]
        if algo.cached_features:  # ANIL: the body once, the inner loop on the head alone
            z_s, z_q = algo.embed(params, batch.support.x[i]), algo.embed(params, qx)
            fast = adapt(algo.head_fn, params, z_s, batch.support.y[i], names=algo.adapt, rule=algo.rule(),
                         steps=S, first_order=algo.current_first_order(), loss_fn=algo.loss_fn).params
            out = algo.head_fn(fast, z_q, 0)
            return algo.loss_fn(out, qy), out
        weights = algo.query_weights()
        res = self._adapt_task(params, batch.support.x[i], batch.support.y[i], steps=S, lr=None,
                               first_order=algo.current_first_order(), trajectory=weights is not None)
        if weights is None:
            out = algo.forward_fn(res.params, qx, max(S - 1, 0))
            return algo.loss_fn(out, qy), out
        loss, out = 0.0, None  # multi-step loss: sum_s v_s L_Q(theta_{s+1})
        for s, (w, fast) in enumerate(zip(weights, res.trajectory)):
            out = algo.forward_fn(fast, qx, s)
            loss = loss + w * algo.loss_fn(out, qy)
        return loss, out

    def _loop_meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        algo = self.algorithm
        params = algo.params()
        total_loss, total_metric, T = 0.0, 0.0, batch.num_tasks
        for i in range(T):
            loss, out = self._task_loss(algo.task_params(params), batch, i)
            (loss / T).backward()
            total_loss += loss.item()
            total_metric += algo.score(out.detach(), batch.query.y[i]).item()
        return {"loss": total_loss / T, algo.metric_name: total_metric / T}

    def _loop_evaluate(self, batch: TaskBatch, steps: int, lr: Optional[float], transductive: bool) -> Tensor:
        algo = self.algorithm
        params = {n: p.detach().requires_grad_(n in algo.adapt) for n, p in algo.params().items()}
        out = []
        if algo.cached_features and transductive:  # ANIL: body features once per task
            for i in range(batch.num_tasks):
                z_s, z_q = algo.embed(params, batch.support.x[i]), algo.embed(params, batch.query.x[i])
                fast = adapt(algo.head_fn, params, z_s, batch.support.y[i], names=algo.adapt, rule=algo.rule(lr),
                             steps=steps, first_order=True, loss_fn=algo.loss_fn).params
                out.append(algo.score(algo.head_fn(fast, z_q, 0), batch.query.y[i]))
                self._episode_done()
            return torch.stack(out).cpu()
        fwd, as_batch = algo.eval_forward(transductive)
        for i in range(batch.num_tasks):
            fast = self._adapt_task(algo.task_params(params), batch.support.x[i], batch.support.y[i], steps=steps,
                                    lr=lr, first_order=True, forward_fn=fwd).params
            fast = {n: p.detach() for n, p in fast.items()}
            pred = scored(lambda x: fwd(fast, x, max(steps - 1, 0)), batch.support.x[i], batch.query.x[i], as_batch)
            out.append(algo.score(pred, batch.query.y[i]))
            self._episode_done()
        return torch.stack(out).cpu()

    # --- batched: all tasks of a chunk at once -----------------------------------------------------
    def _twin(self) -> Optional[BatchedForward]:
        """conv4's or the MLP's hand-written batched forward, when it applies (the algorithm's forward is the
        model's own and `twin` is on), else None."""
        algo = self.algorithm
        return batched_forward(algo.model) if self.twin and algo.plain_forward else None

    def tasks_forward(self, twin: bool = True) -> Callable[[Params, Tensor, int], Tensor]:
        """fn(params, x (T, B, ...), step) -> outputs (T, B, ...): the algorithm's forward on all tasks at once,
        the adapted parameters (Tc, *shape), the others shared: the hand-written twin (conv4, MLP) where
        `twin` and it applies, else vmap. The batched path uses the twin (measured faster there: conv4
        omniglot-5w1s-1step 8.4 s against 12.7 s); hybrid's support pass uses vmap (4.3 s against 4.6 s),
        benchmarks/results/meta_step_models_cpu.txt."""
        algo = self.algorithm
        twin = self._twin() if twin else None
        if twin is not None:
            return lambda p, x, s: twin(p, x)
        per_task = frozenset(algo.adapt)
        return lambda p, x, s: _vmapped(lambda p_, x_: algo.forward_fn(p_, x_, s), per_task, algo.model)(p, x)

    def _adapt_tasks(self, params: Params, batch: TaskBatch, sl: slice, *, steps: int, lr: Optional[float],
                     first_order: bool, twin: bool = True) -> Params:
        """Tasks `sl` adapted together on their support sets: the adapted names come back as (Tc, *shape),
        the others shared."""
        algo = self.algorithm
        x = batch.support.x[sl]
        return adapt(self.tasks_forward(twin), algo.task_params(params), x, batch.support.y[sl], names=algo.adapt,
                     rule=algo.rule(lr), steps=steps, first_order=first_order, loss_fn=algo.summed_task_loss,
                     tasks=x.shape[0], checkpoint=algo.inner_checkpoint).params

    def _features_and_head(self) -> "tuple[BatchedForward, BatchedForward]":
        """ANIL: (body on all tasks, shared parameters) and (head on all tasks, per-task head parameters)."""
        algo = self.algorithm
        if self.twin and batched_features(algo.model) is not None:
            return batched_features(algo.model), batched_head(algo.model)
        features = _vmapped(algo.embed, frozenset(), algo.model)
        head = _vmapped(lambda p, z: algo.head_fn(p, z, 0), frozenset(algo.adapt), algo.model)
        return features, head

    def _batched_query_outputs(self, params: Params, batch: TaskBatch, sl: slice, *, steps: int,
                               lr: Optional[float], first_order: bool) -> Tensor:
        """Query outputs (Tc, Q, ...) of tasks `sl`, each adapted on its support set, all at once."""
        algo = self.algorithm
        if algo.cached_features:  # ANIL: body features of all tasks at once, then the heads adapted together
            features, head = self._features_and_head()
            z_s, z_q = features(params, batch.support.x[sl]), features(params, batch.query.x[sl])  # (Tc, B, D)
            fast = adapt(lambda p, z, s: head(p, z), params, z_s, batch.support.y[sl], names=algo.adapt,
                         rule=algo.rule(lr), steps=steps, first_order=first_order, loss_fn=algo.summed_task_loss,
                         tasks=z_s.shape[0]).params
            return head(fast, z_q)
        fast = self._adapt_tasks(params, batch, sl, steps=steps, lr=lr, first_order=first_order)
        return self.tasks_forward()(fast, batch.query.x[sl], max(steps - 1, 0))

    def _batched_meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        algo = self.algorithm
        params, T = algo.params(), batch.num_tasks
        losses, metrics = [], []
        for sl in self._chunks(T):
            out = self._batched_query_outputs(params, batch, sl, steps=algo.inner_steps, lr=None,
                                              first_order=algo.current_first_order())
            loss = algo.task_losses(out, batch.query.y[sl])  # (Tc,)
            (loss.sum() / T).backward()
            losses.append(loss.detach())
            metrics.append(algo.task_scores(out.detach(), batch.query.y[sl]))
        return {"loss": torch.cat(losses).double().mean().item(), algo.metric_name: torch.cat(metrics).mean().item()}

    def _batched_evaluate(self, batch: TaskBatch, steps: int, lr: Optional[float]) -> Tensor:
        algo = self.algorithm
        params = {n: p.detach().requires_grad_(n in algo.adapt) for n, p in algo.params().items()}
        out = [algo.task_scores(self._batched_query_outputs(params, batch, sl, steps=steps, lr=lr,
                                                            first_order=True).detach(), batch.query.y[sl])
               for sl in self._chunks(batch.num_tasks)]
        return torch.cat(out).cpu()

    # --- hybrid: batched support sets, per-task query sets ------------------------------------------
    @staticmethod
    def _query_images(x: Tensor) -> Tensor:
        return channels_last(x) if x.device.type == "cpu" and x.dim() >= 5 else x

    def _hybrid_adapt(self, params: Params, batch: TaskBatch, sl: slice, *, steps: int, lr: Optional[float],
                      first_order: bool) -> Params:
        """Hybrid's support pass for tasks `sl`: the adapted names as (Tc, *shape). Several tasks run through
        vmap; a chunk of one task (large per-task activations, see `_hybrid_chunks`) runs the task's own
        forward, as the loop does: batching one task gains nothing, and vmap would cost its overhead and the
        plain-reduction BatchNorm (metalearn/inner/norm.py) on every large support activation."""
        if sl.stop - sl.start > 1:
            return self._adapt_tasks(params, batch, sl, steps=steps, lr=lr, first_order=first_order, twin=False)
        algo, i = self.algorithm, sl.start
        fast = self._adapt_task(algo.task_params(params), batch.support.x[i], batch.support.y[i], steps=steps,
                                lr=lr, first_order=first_order).params
        return {**fast, **{n: fast[n].unsqueeze(0) for n in algo.adapt}}

    def _hybrid_meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        algo = self.algorithm
        params, T = algo.params(), batch.num_tasks
        query_x, last = self._query_images(batch.query.x), max(algo.inner_steps - 1, 0)
        total_loss, total_metric = 0.0, 0.0
        for sl in self._hybrid_chunks(batch):
            fast = self._hybrid_adapt(params, batch, sl, steps=algo.inner_steps, lr=None,
                                      first_order=algo.current_first_order())
            names = [n for n in algo.adapt if fast[n].requires_grad]
            vjp = {n: torch.zeros_like(fast[n]) for n in names}
            for j, i in enumerate(range(sl.start, sl.stop)):
                leaves = {n: fast[n][j].detach().requires_grad_() for n in algo.adapt}
                with first_order_norms():  # backpropagated once: BatchNorm's fused first-order backward
                    out = algo.forward_fn({**fast, **leaves}, query_x[i], last)
                loss = algo.loss_fn(out, batch.query.y[i])
                (loss / T).backward()  # shared (non-adapted) parameters get their direct gradient here
                for n in names:
                    if leaves[n].grad is not None:
                        vjp[n][j] = leaves[n].grad
                total_loss += loss.item()
                total_metric += algo.score(out.detach(), batch.query.y[i]).item()
            if names:  # through the support graph: theta, and learnables such as Meta-SGD's alpha
                torch.autograd.backward([fast[n] for n in names], [vjp[n] for n in names])
        return {"loss": total_loss / T, algo.metric_name: total_metric / T}

    def _hybrid_evaluate(self, batch: TaskBatch, steps: int, lr: Optional[float]) -> Tensor:
        algo = self.algorithm
        params = {n: p.detach().requires_grad_(n in algo.adapt) for n, p in algo.params().items()}
        query_x, last, out = self._query_images(batch.query.x), max(steps - 1, 0), []
        for sl in self._hybrid_chunks(batch):
            fast = self._hybrid_adapt(params, batch, sl, steps=steps, lr=lr, first_order=True)
            for j, i in enumerate(range(sl.start, sl.stop)):
                task = {**fast, **{n: fast[n][j].detach() for n in algo.adapt}}
                out.append(algo.score(algo.forward_fn(task, query_x[i], last), batch.query.y[i]))
        return torch.stack(out).cpu()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """model.eval() inside (Dropout and DropBlock off; BatchNorm still uses batch statistics, see
    metalearn/inner/norm.py), each module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _vmapped(fn: Callable[[Params, Tensor], Tensor], per_task: "frozenset[str]", model: nn.Module) -> BatchedForward:
    """task_vmap(fn, per_task), with a model that vmap cannot run refused in one line (not a C++ trace)."""
    run = task_vmap(fn, per_task)

    def call(params: Params, x: Tensor) -> Tensor:
        try:
            return run(params, x)
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "vmap" not in str(e) and "batching rule" not in str(e).lower() and "Batched" not in str(e):
                raise
            raise MetalearnError(f"the batched path (torch.func.vmap over tasks) cannot run model "
                                 f"{type(model).__name__}: {first}; use outer.execution=loop") from e

    return call


def execute(algorithm: Any, execution: str = "auto", task_chunk: int = 0, twin: bool = True) -> Engine:
    """`Engine(algorithm, execution, task_chunk, twin)`; an Engine passed in gets its settings replaced."""
    if isinstance(algorithm, Engine):
        algorithm = algorithm.algorithm
    return Engine(algorithm, execution, task_chunk, twin)


__all__ = ["EXECUTIONS", "Engine", "execute"]
