"""What every algorithm shares, and what a gradient-based (MAML-family) algorithm declares.

An algorithm object holds the model (whose parameters are the meta-parameters theta) and,
for some algorithms, extra learnables (Meta-SGD's alpha, MAML++'s per-step lrs) returned by
`meta_parameters()` and saved with `state_dict()`. It says WHAT the algorithm is; the engine
(metalearn/engine.py) says HOW a meta-batch is executed (per-task loop, batched, hybrid). The
training loop holds an engine around the algorithm and calls, per outer step:

    learner.schedule(step, total_steps, optimizer)   # annealing (Reptile's epsilon, MAML++)
    learner.meta_step(batch)                         # accumulates .grad, returns metrics
    optimizer.step()                                 # optimizer = learner.outer_optimizer(...)

Two kinds of algorithm:
  GradientMetaLearner  declares its inner loop (mask, update rule, steps, first-order schedule,
                       query loss, forward); the engine runs it in every execution mode.
  MetaLearner          an algorithm with its own per-task `meta_step` and `evaluate_batch`
                       (Reptile's parameter-difference update, ProtoNet's prototypes), which the
                       engine runs as they are.

BatchNorm policy at scoring time (`transductive`):
    True   the query set is one batch, so BatchNorm normalises with the query batch's statistics
           (MAML's and Reptile's transductive setting);
    False  each query example is scored alone in a batch with the support set
           (support + 1 example), so no query example sees another's statistics (Reptile's
           non-transductive setting, Nichol et al. 2018, Sec. 6).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, ContextManager, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MetalearnError
from ..inner import SGD, forward, select
from ..inner.batched import task_losses, task_metrics
from ..inner.rules import LRSpec
from ..types import Params
from .registry import Capabilities

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
METRICS = {"cross_entropy": "accuracy", "mse": "mse"}

LossSpec = Union[str, Callable[[Tensor, Tensor], Tensor]]
"""`cross_entropy`, `mse`, or a callable loss(outputs (B, ...), targets (B, ...)) -> the batch's mean loss (a
differentiable scalar; the inner loop differentiates it twice for second-order algorithms)."""
MetricSpec = Union[None, Callable[[Tensor, Tensor], Tensor], Tuple[str, Callable[[Tensor, Tensor], Tensor]]]
"""None (accuracy; the MSE for loss=`mse`), a callable metric(outputs (Q, ...), targets (Q, ...)) -> a scalar
(named by the function's __name__), or (name, callable). Evaluation reports its mean and 95% CI over episodes."""


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

    capabilities = Capabilities()
    """What the algorithm supports (metalearn/algorithms/registry.py); each algorithm declares its own."""

    @property
    def has_inner_loop(self) -> bool:
        """False for algorithms that adapt without inner steps (ProtoNet); results then print no steps."""
        return self.capabilities.inner_loop

    @property
    def learns_inner_lr(self) -> bool:
        """True when evaluation adapts with learned lrs (eval.inner_lr does not apply)."""
        return self.capabilities.learns_inner_lr
    on_episode = None
    """Set by evaluation.evaluate while a progress bar is shown: called after each episode is scored."""

    def episode_done(self) -> None:
        """Per-task evaluation loops call this after each episode (the evaluation bar moves per episode)."""
        if self.on_episode is not None:
            self.on_episode()

    def __init__(self, model: nn.Module, *, loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        self.model = model
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise MetalearnError(f"loss must be one of {', '.join(LOSSES)} or a callable, got {loss!r}")
            self.loss, self.loss_fn = loss, LOSSES[loss]
        elif callable(loss):
            self.loss, self.loss_fn = "custom", loss
        else:
            raise MetalearnError(f"loss must be one of {', '.join(LOSSES)} or a callable (outputs, targets) -> "
                                 f"mean loss, got {type(loss).__name__}")
        self.metric_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None  # None: the built-in one
        self.metric_name = METRICS.get(self.loss, "accuracy")
        if metric is not None:
            name, fn = metric if isinstance(metric, tuple) else (getattr(metric, "__name__", "metric"), metric)
            if not callable(fn) or not isinstance(name, str):
                raise MetalearnError("metric must be a callable (outputs, targets) -> scalar, or a (name, callable) "
                                     "pair")
            self.metric_name, self.metric_fn = name, fn

    # --- losses and scores: the built-in ones or the user's callables ---------------------------
    def score(self, outputs: Tensor, y: Tensor) -> Tensor:
        """The metric of one task's outputs (Q, ...) against its targets: a float64 scalar."""
        if self.metric_fn is None:
            return metric(outputs, y, "mse" if self.loss == "mse" else "cross_entropy")
        return torch.as_tensor(self.metric_fn(outputs, y)).detach().double().reshape(())

    def task_losses(self, outputs: Tensor, y: Tensor) -> Tensor:
        """Each task's mean loss: outputs (T, B, ...) with targets (T, B, ...) -> (T,)."""
        if self.loss != "custom":
            return task_losses(outputs, y, self.loss)
        return torch.stack([self.loss_fn(o, t) for o, t in zip(outputs, y)])

    def task_scores(self, outputs: Tensor, y: Tensor) -> Tensor:
        """Each task's metric: outputs (T, Q, ...) with targets (T, Q, ...) -> (T,) float64."""
        if self.metric_fn is None:
            return task_metrics(outputs, y, "mse" if self.loss == "mse" else "cross_entropy")
        return torch.stack([self.score(o, t) for o, t in zip(outputs, y)])

    def summed_task_loss(self, outputs: Tensor, y: Tensor) -> Tensor:
        """The batched inner loop's support loss: the sum over tasks of each task's mean loss."""
        return self.task_losses(outputs, y).sum()

    def params(self) -> Params:
        return dict(self.model.named_parameters())

    default_adapt: Sequence[str] = ("*",)
    """The inner mask when inner.adapt is left at its default."""

    @classmethod
    def configured_adapt(cls, cfg) -> List[str]:
        """inner.adapt, or this algorithm's default mask when the config leaves it at the default."""
        adapt = cfg.inner.adapt
        if adapt is None:
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
    """A MAML-family algorithm, declared: which parameters adapt, how, for how many steps, in what order.

    Declared by the class (and refined by its constructor):
      default_adapt        the inner mask when inner.adapt is left at its default (MAML: all; ANIL: the head)
      adapt                the selected names (`inner.adapt` patterns resolved on the model)
      rule(lr)             the inner update rule: SGD with `lr_spec(lr)` (a float; per-step or per-element
                           learned lrs for MAML++ and Meta-SGD); a test-time lr replaces a scalar lr only
      inner_steps          S, the inner steps of training (evaluation may use another number)
      current_first_order  whether the inner gradients are constants at this outer step (FOMAML always;
                           MAML++ during its derivative-order annealing)
      forward_fn           the model at given parameters on a batch at inner step s (MAML++'s per-step
                           BatchNorm takes the step)
      cached_features      ANIL: the body runs once per task, the inner loop runs the head alone
                           (`embed`, `head_fn`)
      query_weights()      per-step query-loss weights (MAML++'s multi-step loss) or None: the query
                           loss of the last step only
      eval_forward(t)      the forward used at evaluation, and whether the query set is scored as one
                           batch (MAML++ inductive: per-step running statistics)
      inner_checkpoint     recompute inner activations in the outer backward (memory flat in S)
      lora                 LoRA deltas adapted instead of the selected weights (use_lora)
    """

    capabilities = Capabilities(batchable=True, hybrid=True, lora=True, inner_checkpoint=True)
    cached_features = False
    inner_checkpoint = False

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("*",), loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, loss=loss, metric=metric)
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.adapt = select([n for n, _ in model.named_parameters()], adapt, what="inner.adapt")

    @classmethod
    def from_config(cls, cfg, model: nn.Module, loss: str = "cross_entropy") -> "GradientMetaLearner":
        cls.check_config(cfg)
        algorithm = cls(model, **cls.config_kwargs(cfg), loss=loss)
        if not cls.capabilities.own_lr_schedule:
            algorithm.lr_halve_every = cfg.outer.lr_halve_every
        algorithm.set_checkpoint(cfg.inner.checkpoint)
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

    # --- the declaration the engine reads ----------------------------------------------------
    def lr_spec(self, lr: Optional[float] = None) -> LRSpec:
        """The inner lr spec; `lr` (a test-time override) replaces a scalar inner lr."""
        return self.inner_lr if lr is None else lr

    def rule(self, lr: Optional[float] = None) -> SGD:
        """The inner update rule (SGD with lr_spec(lr))."""
        return SGD(self.lr_spec(lr))

    def current_first_order(self) -> bool:
        """Whether this outer step's inner gradients are constants (FOMAML: always)."""
        return self.first_order

    def forward_fn(self, params: Params, x: Tensor, step: int) -> Tensor:
        """The model at `params` on a batch x; `step` = the inner step (for per-step BatchNorm)."""
        return forward(self.model, params, x)

    @property
    def plain_forward(self) -> bool:
        """True when `forward_fn` is the model's own forward (the engine may then use a hand-written batched
        twin of the model, metalearn/inner/batched.py), False when a subclass overrides it."""
        return type(self).forward_fn is GradientMetaLearner.forward_fn

    def task_params(self, params: Params) -> Params:
        """The parameters a task's inner loop starts from: the model's, plus any per-task extras that
        start afresh on every task (CAVIA's context vector). Default: the model's parameters."""
        return params

    def query_weights(self) -> Optional[List[float]]:
        """Weights v_s of the query losses after inner steps s = 1..S (multi-step loss), or None:
        the query loss after the last step alone."""
        return None

    def eval_forward(self, transductive: bool) -> "tuple[Callable[[Params, Tensor, int], Tensor], bool]":
        """(forward used at evaluation, whether the query set is scored as one batch). Transductive:
        one batch (BatchNorm sees the query batch's statistics); otherwise each query example is scored
        with the support set (see `scored`)."""
        return self.forward_fn, transductive

    def evaluating(self) -> ContextManager[None]:
        """Context of an evaluation (MAML++: model.eval(), no running-statistics updates)."""
        return contextlib.nullcontext()

    # --- inner-loop options -------------------------------------------------------------------
    def set_checkpoint(self, on: bool) -> "GradientMetaLearner":
        """Inner-loop activation checkpointing: recompute each inner step's activations in the outer
        backward instead of keeping them (second order: memory flat in the number of inner steps, about
        one more support forward and backward per step; the same meta-gradient)."""
        if on and not self.capabilities.inner_checkpoint:
            raise MetalearnError(f"inner.checkpoint: {type(self).__name__} does not support inner-loop checkpointing; "
                                 "supported: maml, fomaml, boil, metasgd")
        self.inner_checkpoint = bool(on)
        return self

    lora = None
    lora_full: List[str] = []

    def use_lora(self, rank: int, alpha: float = 0.0, seed: int = 0) -> "GradientMetaLearner":
        """Adapt each selected weight with >= 2 dims through a rank-`rank` delta (B zero at every task's
        start, A fixed by `seed`); selected 1-dim tensors (biases, BatchNorm) still adapt in full.
        For algorithms that declare `lora` (MAML, FOMAML); the engine then runs the per-task loop."""
        from ..inner.lora import LoRA, lora_targets

        if not self.capabilities.lora:
            raise MetalearnError(f"LoRA inner loop: {type(self).__name__} does not support it")
        params = self.params()
        low, self.lora_full = lora_targets(params, self.adapt)
        if not low:
            raise MetalearnError("inner.lora_rank: inner.adapt selects no weight with >= 2 dims")
        self.lora = LoRA(params, low, rank, alpha, seed)
        return self
