"""CAVIA: fast context adaptation via meta-learning.

Zintgraf, Shiarlis, Kurin, Hofmann, Whiteson. "Fast Context Adaptation via Meta-Learning." ICML 2019.
https://arxiv.org/abs/1810.03642   (code: github.com/lmzintgraf/cavia)

The parameters split in two (Sec. 3): context parameters phi, a vector of `context_dim` numbers that is an
extra input of the network, adapt in the inner loop; the shared parameters theta (the network and the layer
that reads phi) are meta-trained by the outer loop. For a meta-batch of T tasks with support sets S_i and
query sets Q_i (Algorithm 1):

    phi_{i,0}     = 0                                                      reset for every task
    phi_{i,s+1}   = phi_{i,s} - alpha * grad_phi L_{S_i}(f(.; theta, phi_{i,s}))     s = 0..S-1
    theta        <- theta - beta * grad_theta (1/T) sum_i L_{Q_i}(f(.; theta, phi_{i,S}))   (Adam here)

Second order: grad_theta differentiates through the inner updates (phi_{i,S} depends on theta through the
support gradients). First order (inner.first_order): the inner gradients are constants, so phi_{i,S} carries
no gradient to theta and theta gets its direct gradient at phi_{i,S} (the code's --first_order).

How phi enters the network:
  FiLM    images (conv4, cavia.film=true): [gamma, beta] = W phi + b, a linear layer with 2C outputs for the
          C channels of conv block `cavia.film_block`, and that block computes
              relu(gamma * maxpool(BN(conv(h))) + beta)          (per channel)
          as the paper's mini-ImageNet network (Sec. 5.2; the code's CondConvNet: conv, BatchNorm, max-pool,
          FiLM, ReLU; its default puts the FiLM layer at the third block, film_block=2, with 100 context
          parameters). W is Kaiming-uniform with linear gain, b PyTorch's default (the code's default
          initialisation); gamma is W phi + b itself (no "1 +"), as in the code.
  concat  the sinusoid MLP: phi concatenated to the input x (Sec. 5.1; the code's CaviaModel), written as
          the first layer computing W_x x + W_phi phi + b, which is that layer applied to [x, phi];
          images with cavia.film=false: phi concatenated to the flattened features before the head (the
          code's context_in[4]; alone, an input-independent shift of each logit: an ablation, it cannot
          tell a task's classes apart). W_phi starts uniform in +-1/sqrt(fan_in + context_dim), as the concatenated
          layer's own initialisation.
The layer that reads phi (W, b or W_phi) is part of theta: CAVIA's learnables (`meta_parameters`), trained
by the outer optimiser with the model (always: outer.train masks the model's parameters only) and saved as
the checkpoint's "algorithm" state (`state_dict`), which `metalearn eval` and --resume restore; the model
itself is unchanged, so its checkpoint entry is that of any algorithm. phi is not a parameter
anywhere: `task_params` gives every task (in training and evaluation) a fresh zero vector, the inner loop
adapts it alone, and the outer optimiser never sees it. The model's forward reads the conditioning from the
params dict through a forward hook on the conditioned module, registered for the duration of one call.

Paper settings (from the authors' code, regression/arguments.py and classification/arguments.py):
  sinusoid       MLP 1-40-40-1 with 5 context parameters at the input, 1 inner step of lr 1.0, K = 10
                 support and 10 query points, meta-batch 25, Adam 1e-3, 50000 iterations
                 (presets/configs/cavia_sinusoid.yaml).
  mini-ImageNet  4 conv blocks of 32 filters (the paper also reports 128 and 512), 100 context parameters,
                 FiLM at the third block, 2 inner steps of lr 1.0 in training and at test time, meta-batch 16,
                 15 query examples per class, Adam 1e-3, 60000 iterations. The paper has no Omniglot
                 experiment: presets/configs/cavia_omniglot_5w1s.yaml carries these settings over.
In both, the inner lr (1.0) is far larger than MAML's: only phi moves, and it starts at zero.

Deviations: no gradient clipping (the code clamps the meta-gradient to [-10, 10], per task for regression,
after averaging for classification); the model keeps its own initialisation (the code initialises the
convolutions Kaiming-uniform with zero biases; its regression input layer has fan-in 1 + context_dim where
ours has the MLP's fan-in 1 for x and the bias); conv4 with 64 filters on Omniglot. Only conv4 and the MLP
are conditioned (`outer.execution` runs the per-task loop: the batched paths cover the plain models only).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MetalearnError
from ..inner import forward
from ..models import MLP, Conv4
from ..types import Params
from .base import GradientMetaLearner, LossSpec, MetricSpec
from .registry import Capabilities, register

CONTEXT = "context"
"""The name of phi in a task's params dict (the only name the inner loop adapts)."""


class Conditioning(nn.Module):
    """The shared layer that reads the context phi, and the module of the model whose output it changes.

    kind "film":   parameters film.weight (2C, D), film.bias (2C,); out -> gamma * out + beta per channel.
    kind "concat": parameter context_in.weight (F, D); out -> out + W_phi phi, for a linear `site` with F
                   outputs: the same as that layer applied to its input concatenated with phi.
    """

    def __init__(self, kind: str, site: str, context_dim: int, width: int, fan_in: int = 0):
        super().__init__()
        self.kind, self.site = kind, site
        if kind == "film":
            self.film = nn.Linear(context_dim, 2 * width)
            nn.init.kaiming_uniform_(self.film.weight, nonlinearity="linear")
        else:
            self.context_in = nn.Linear(context_dim, width, bias=False)
            bound = 1.0 / math.sqrt(fan_in + context_dim)
            nn.init.uniform_(self.context_in.weight, -bound, bound)

    def by_name(self) -> Dict[str, nn.Parameter]:
        """{name in a params dict: parameter}: film.weight, film.bias or context_in.weight."""
        return dict(self.named_parameters())

    def apply_to(self, params: Params, context: Tensor, out: Tensor) -> Tensor:
        """The site's output `out` (B, C, ...) conditioned on `context` (D,) with the weights in `params`."""
        if self.kind == "film":
            gamma, beta = F.linear(context, params["film.weight"], params["film.bias"]).chunk(2)
            shape = (1, -1) + (1,) * (out.dim() - 2)
            return gamma.view(shape) * out + beta.view(shape)
        return out + F.linear(context, params["context_in.weight"])


def conditioning_for(model: nn.Module, context_dim: int, film: bool, film_block: int) -> Conditioning:
    """Where and how phi enters `model` (see the module docstring); a one-line error for other models."""
    if isinstance(model, MLP):  # regression: concatenated to the input (film does not apply)
        first = model.features[0]
        return Conditioning("concat", "features.0", context_dim, first.out_features, first.in_features)
    if not isinstance(model, Conv4):
        raise MetalearnError(f"cavia conditions conv4 (FiLM) or mlp (input concatenation), not {type(model).__name__}")
    if not film:  # concatenated to the flattened features before the head
        return Conditioning("concat", "head", context_dim, model.head.out_features, model.head.in_features)
    blocks = len(model.features)
    if not 0 <= film_block < blocks:
        raise MetalearnError(f"cavia.film_block must be in 0..{blocks - 1} (the conv blocks of "
                             f"{type(model).__name__}), got {film_block}")
    block = model.features[film_block]
    return Conditioning("film", f"features.{film_block}.pool", context_dim, block.conv.out_channels)


@register("cavia")
class CAVIA(GradientMetaLearner):
    """CAVIA over conv4 (FiLM) or the sinusoid MLP (input concatenation); see the module docstring."""

    capabilities = Capabilities(batchable=False, hybrid=False, shardable=True, lora=False, inner_checkpoint=True)
    default_adapt = (CONTEXT,)

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 context_dim: int = 100, film: bool = True, film_block: int = 2,
                 loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         loss=loss, metric=metric)
        if context_dim < 1:
            raise MetalearnError(f"cavia.context_dim must be >= 1, got {context_dim}")
        self.context_dim = context_dim
        ref = next(model.parameters())
        self.conditioning = conditioning_for(model, context_dim, film, film_block).to(device=ref.device,
                                                                                     dtype=ref.dtype)
        self.site = model.get_submodule(self.conditioning.site)
        self.adapt = [CONTEXT]  # the inner loop adapts phi alone

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.inner.adapt is not None:
            raise MetalearnError("inner.adapt: cavia adapts only its context parameters; leave inner.adapt unset")
        if cfg.cavia.context_dim < 1:
            raise MetalearnError(f"cavia.context_dim must be >= 1, got {cfg.cavia.context_dim}")
        if cfg.model.name not in ("conv4", "mlp"):
            raise MetalearnError(f"model.name: cavia conditions conv4 (FiLM) or mlp (input concatenation), "
                                 f"not {cfg.model.name}")

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        c = cfg.cavia
        return dict(inner_lr=cfg.inner.lr, inner_steps=cfg.inner.steps, first_order=cfg.inner.first_order,
                    context_dim=c.context_dim, film=c.film, film_block=c.film_block)

    # --- theta: the model's parameters and the conditioning layer ---------------------------------
    def params(self) -> Params:
        return {**dict(self.model.named_parameters()), **self.conditioning.by_name()}

    def meta_parameters(self) -> List[nn.Parameter]:
        return list(self.conditioning.parameters())

    def state_dict(self) -> dict:
        """{"conditioning": {film.weight, film.bias | context_in.weight: tensor}}."""
        return {"conditioning": {n: p.detach().clone() for n, p in self.conditioning.by_name().items()}}

    def load_state_dict(self, state: dict) -> None:
        mine = self.conditioning.by_name()
        saved = state.get("conditioning", {})
        if set(state) != {"conditioning"} or set(saved) != set(mine) or any(
                saved[n].shape != p.shape for n, p in mine.items()):
            got = {n: tuple(t.shape) for n, t in saved.items()}
            raise MetalearnError(f"cavia state: the conditioning layer does not match the config "
                                 f"(expected {({n: tuple(p.shape) for n, p in mine.items()})}, got {got})")
        with torch.no_grad():
            for n, p in mine.items():
                p.copy_(saved[n])

    # --- phi: zero for every task; the forward reads it from the params dict ---------------------
    def task_params(self, params: Params) -> Params:
        ref = next(self.model.parameters())
        phi = torch.zeros(self.context_dim, dtype=ref.dtype, device=ref.device, requires_grad=True)
        return {**params, CONTEXT: phi}

    def forward_fn(self, params: Params, x: Tensor, step: int) -> Tensor:
        """The model at `params` on x, the site's output conditioned on params["context"]."""
        own = {CONTEXT, *self.conditioning.by_name()}
        condition = self.conditioning.apply_to
        handle = self.site.register_forward_hook(lambda module, inputs, out: condition(params, params[CONTEXT], out))
        try:
            return forward(self.model, {n: p for n, p in params.items() if n not in own}, x)
        finally:
            handle.remove()
