"""MAML and first-order MAML.

Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks."
ICML 2017. https://arxiv.org/abs/1703.03400

For a meta-batch of tasks T_i with support set S_i and query set Q_i (Algorithm 2):

    theta_i' = theta - alpha * grad_theta L_{S_i}(theta)           (inner loop, `inner.steps` times)
    theta   <- theta - beta * grad_theta (1/T) sum_i L_{Q_i}(theta_i')   (outer step; Adam here)

Second order: grad_theta L_Q(theta') differentiates through the inner updates, including the
Hessian-vector products. First order (FOMAML, Sec. 5.2): the inner gradients are treated as
constants, so grad_theta L_Q(theta') = grad_theta' L_Q(theta').

Regression (Sec. 5.1, sinusoid): loss="mse" uses the mean squared error and reports "mse".

Deviations from the paper: Adam with the outer lr from the config (the paper also uses Adam);
conv4 with max-pooling on Omniglot (the paper's Omniglot net uses strided convolutions);
BatchNorm always uses the batch statistics (as in the paper's code). Only the parameters
matched by `adapt` move in the inner loop; the others are shared as in ANIL.

Declared for the engine (metalearn/engine.py): SGD inner rule with a scalar lr, every parameter
adapted unless `adapt` says otherwise; loop, batched and hybrid execution, LoRA, inner checkpointing.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import GradientMetaLearner, LossSpec, MetricSpec
from .registry import Capabilities, register


@register("maml")
class MAML(GradientMetaLearner):
    """Second-order MAML (first_order=False) or FOMAML (first_order=True) over a module's parameters."""

    capabilities = Capabilities(batchable=True, hybrid=True, lora=True, inner_checkpoint=True, compile=True)

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("*",), loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         adapt=adapt, loss=loss, metric=metric)


@register("fomaml")
class FOMAML(MAML):
    """First-order MAML: `first_order` is always on (see the module docstring)."""

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = True,
                 adapt: Sequence[str] = ("*",), loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True, adapt=adapt,
                         loss=loss, metric=metric)
