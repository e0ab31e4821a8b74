"""The inner loop: rapid fine-tuning of selected parameters on a task's support set (or on the
support sets of many tasks at once: `adapt(..., tasks=T)`, the batched path's inner loop).

Pure function over a params dict (as in torch.func's MAML example): it returns new fast
parameters and never mutates the module or the input dict. For each step s = 0..S-1

    g_s          = d L_support(theta_s) / d theta_s[n]                  for n in `adapt`
    theta_{s+1}  = rule(theta_s, g_s, s)   (SGD: theta_s[n] - lr(n, s) * g_s[n]; or Adam)
    theta_{s+1}[n] = theta_s[n]            for n not in `adapt` (the same tensor object)

With first_order=False the graph of every step is kept (create_graph=True), so a loss on
theta_S differentiates through the whole inner loop (second-order MAML). With
first_order=True the inner gradients are constants (d theta_S / d theta_0 = I, FOMAML), but a
learnable lr stays in the graph (Meta-SGD's first-order mode still trains alpha).

`forward_fn(params, x, step)` lets a model take the step index (MAML++'s per-step BatchNorm)
or lets ANIL run only the head on cached features; the default is `model(x)` at `params`.

checkpoint=True (second order, stateless rules): each step runs under
torch.utils.checkpoint (non-reentrant), so the support activations and the step's backward
graph are not kept; the outer backward recomputes them, step by step. Memory no longer grows
with the number of steps (beyond the S parameter sets theta_s), for about one more support
forward and backward per step. The meta-gradient is the same (tests: bit for bit on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..types import Examples, Params
from .norm import stateless
from .rules import SGD, LRSpec

Loss = Callable[[Tensor, Tensor], Tensor]
ForwardFn = Callable[[Params, Tensor, int], Tensor]


def forward(model: nn.Module, params: Params, x: Tensor, **kwargs: Any) -> Tensor:
    """model(x, **kwargs) evaluated at `params` (names missing from params fall back to the module's own).

    BatchNorm follows the normalisation policy of metalearn/inner/norm.py: batch statistics, running
    statistics neither read nor written (the model runs through its `stateless` view)."""
    return functional_call(stateless(model), params, (x,), kwargs or None, strict=False)


@dataclass
class InnerResult:
    """params: theta_S; trajectory: [theta_1, ..., theta_S] (if asked); state: the rule's final state."""
    params: Params
    trajectory: List[Params]
    state: Any


def checkpointed(update: Callable[[Params], Params], fast: Params, names: Sequence[str]) -> Params:
    """update(fast) with the tensors `names` as the checkpoint's inputs: activations inside `update`
    are dropped after the forward and recomputed when the backward needs them."""
    def run(*tensors: Tensor):
        new = update({**fast, **dict(zip(names, tensors))})
        return tuple(new[n] for n in names)

    return {**fast, **dict(zip(names, _checkpoint(run, *[fast[n] for n in names], use_reentrant=False)))}


def task_dim(p: Tensor, shape: torch.Size, T: int) -> Tensor:
    """A parameter as (T, *shape): per-task tensors pass through, a shared one is broadcast."""
    return p if p.dim() == len(shape) + 1 else p.expand(T, *shape)


def adapt(forward_fn: ForwardFn, params: Params, x: Tensor, y: Tensor, *, names: Sequence[str], rule, steps: int,
          first_order: bool = False, loss_fn: Loss = F.cross_entropy, tasks: Optional[int] = None, state: Any = None,
          trajectory: bool = False, checkpoint: bool = False) -> InnerResult:
    """THE inner loop: `steps` updates of `rule` on the parameters `names`, for one task or a batch of tasks.

    One task (tasks=None): x (B, ...), y (B, ...); loss_fn(outputs, y) is the task's support loss.
    T tasks at once (tasks=T): x (T, B, ...), y (T, B, ...); the parameters `names` get a leading task
    dimension (T, *shape) (a shared tensor is broadcast), the others stay shared, forward_fn runs all
    tasks in one call (a batched model, metalearn/inner/batched.py), and loss_fn(outputs, y) must be
    the SUM over tasks of each task's mean loss: task t's loss depends on task t's parameters only, so
    one autograd.grad call gives every task its own gradient, and rule.step applies the per-task
    update to all of them at once (an lr spec broadcasts over T).

    forward_fn(params, x, step) is the model at `params` (step = the inner step, for per-step
    BatchNorm). `state` is the rule's starting state (None = rule.init), returned, never mutated.
    trajectory: also return [theta_1, ..., theta_S]. checkpoint: see the module docstring.
    """
    names = list(names)
    fast: Params = dict(params)
    path: List[Params] = []

    def step(fast: Params, state: Any, s: int):
        loss = loss_fn(forward_fn(fast, x, s), y)
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order)
        return rule.step(fast, dict(zip(names, grads)), state, s)

    with torch.enable_grad():
        if tasks is not None:
            for n in names:
                fast[n] = task_dim(params[n], params[n].shape, tasks)
        state = rule.init(fast, names) if state is None else state
        if checkpoint and state is not None:
            raise ValueError(f"inner-loop checkpointing needs a stateless rule, not {type(rule).__name__}")
        for s in range(steps):
            if checkpoint and not first_order:
                fast = checkpointed(lambda f: step(f, None, s)[0], fast, names)
            else:
                fast, state = step(fast, state, s)
            if trajectory:
                path.append(fast)
    return InnerResult(fast, path, state)


_adapt = adapt  # run_inner_loop's keyword `adapt` (the names) shadows the function


def run_inner_loop(model: nn.Module, params: Params, support: Examples, *, adapt: Sequence[str], steps: int,
                   rule=None, lr: Optional[LRSpec] = None, state: Any = None, first_order: bool = False,
                   loss_fn: Loss = F.cross_entropy, forward_fn: Optional[ForwardFn] = None,
                   trajectory: bool = False, checkpoint: bool = False) -> InnerResult:
    """`adapt` for one task of a module: `steps` updates of `rule` (default SGD(lr)) on the support set
    (x (B, ...), y (B, ...)); forward_fn defaults to the module at the given params."""
    if rule is None:
        if lr is None:
            raise ValueError("adapt: give an lr or a rule")
        rule = SGD(lr)
    if forward_fn is None:
        forward_fn = lambda p, x, s: forward(model, p, x)  # noqa: E731
    return _adapt(forward_fn, params, support.x, support.y, names=adapt, rule=rule, steps=steps,
                  first_order=first_order, loss_fn=loss_fn, state=state, trajectory=trajectory,
                  checkpoint=checkpoint)


def inner_loop(model: nn.Module, params: Params, support: Examples, *, adapt: Sequence[str], lr: LRSpec,
               steps: int, first_order: bool = False, loss_fn: Loss = F.cross_entropy,
               forward_fn: Optional[ForwardFn] = None) -> Params:
    """Adapted parameters after `steps` SGD steps on one task's support set (x (B, C, H, W), y (B,))."""
    return run_inner_loop(model, params, support, adapt=adapt, lr=lr, steps=steps, first_order=first_order,
                          loss_fn=loss_fn, forward_fn=forward_fn).params
