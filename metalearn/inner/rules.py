"""Inner-loop update rules and learning-rate specs, written as pure functions of tensors.

Every rule maps (fast params, their gradients, rule state, step index) to new fast params and
new state, using only differentiable tensor ops, so a loss on the result can be differentiated
through the rule (second order) or, when the gradients are detached (first order), still
through the learnable learning rates.

Learning-rate specs (`lr` of `SGD`), looked up as lr(name, step):
    float                  alpha, shared by every parameter and step (MAML)
    PerStepLR              one learnable alpha per parameter tensor and step (MAML++'s LSLR,
                           Antoniou et al. 2019, Sec. 4 "Learning per-layer per-step learning rates")
    PerElementLR           one learnable alpha per parameter element (Meta-SGD, Li et al. 2017, Eq. 3)
    any callable (name, step) -> float | Tensor   (e.g. BOIL's {head: 0, body: alpha})

Rules:
    SGD    theta <- theta - lr(name, step) * g
    Adam   Kingma & Ba 2015 with PyTorch's placement of eps (eps added to sqrt(v_hat)); the
           state (m, v, t) is explicit, so callers choose its policy (Reptile carries it across
           tasks as OpenAI's code does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..types import Params

LRSpec = Union[float, Callable[[str, int], Union[float, Tensor]]]


def _key(name: str) -> str:
    """Parameter names contain '.', which nn.ParameterDict keys may not."""
    return name.replace(".", "__")


class _LRTable(nn.Module):
    """Learnable rates in `self.lrs` (an nn.ParameterDict keyed by escaped parameter names)."""

    def by_name(self) -> Dict[str, nn.Parameter]:
        """{parameter name: its learnable rate tensor}."""
        return {k.replace("__", "."): v for k, v in self.lrs.items()}


class PerStepLR(_LRTable):
    """Learnable alpha[name][step], each initialised to `init` (MAML++ LSLR). Steps beyond the
    trained number reuse the last step's rate (test-time steps may exceed training steps)."""

    def __init__(self, names: Sequence[str], steps: int, init: float, *, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.steps = steps
        self.lrs = nn.ParameterDict({
            _key(n): nn.Parameter(torch.full((steps,), float(init), dtype=dtype, device=device)) for n in names})

    def forward(self, name: str, step: int) -> Tensor:
        return self.lrs[_key(name)][min(step, self.steps - 1)]


class PerElementLR(_LRTable):
    """Learnable alpha with the shape of each adapted parameter, initialised to `init` (Meta-SGD)."""

    def __init__(self, params: Params, names: Sequence[str], init: float):
        super().__init__()
        self.lrs = nn.ParameterDict({_key(n): nn.Parameter(torch.full_like(params[n].detach(), float(init)))
                                     for n in names})

    def forward(self, name: str, step: int) -> Tensor:
        return self.lrs[_key(name)]


def lr_of(lr: LRSpec, name: str, step: int) -> Union[float, Tensor]:
    return lr(name, step) if callable(lr) else lr


class SGD:
    """theta_{s+1}[n] = theta_s[n] - lr(n, s) * g_s[n]. Stateless."""

    def __init__(self, lr: LRSpec):
        self.lr = lr

    def init(self, params: Params, names: Sequence[str]) -> None:
        return None

    def step(self, fast: Params, grads: Dict[str, Tensor], state, step: int) -> Tuple[Params, None]:
        new = dict(fast)
        for n, g in grads.items():
            new[n] = fast[n] - lr_of(self.lr, n, step) * g
        return new, None


@dataclass
class AdamState:
    """m, v: first and second moment estimates by name; t: updates taken so far."""
    m: Dict[str, Tensor]
    v: Dict[str, Tensor]
    t: int

    def detached(self) -> "AdamState":
        return AdamState({k: x.detach().clone() for k, x in self.m.items()},
                         {k: x.detach().clone() for k, x in self.v.items()}, self.t)

    def state_dict(self) -> dict:
        return {"m": dict(self.m), "v": dict(self.v), "t": self.t}

    @staticmethod
    def from_state_dict(d: dict) -> "AdamState":
        return AdamState(dict(d["m"]), dict(d["v"]), int(d["t"]))


class Adam:
    """Differentiable Adam:  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  t += 1;
    theta -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)   (torch.optim.Adam's formula).

    Reptile (Nichol et al. 2018, Sec. 6/Appendix) uses b1 = 0.
    """

    def __init__(self, lr: float, betas: Tuple[float, float] = (0.0, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, params: Params, names: Sequence[str]) -> AdamState:
        zeros = {n: torch.zeros_like(params[n].detach()) for n in names}
        return AdamState(dict(zeros), {n: z.clone() for n, z in zeros.items()}, 0)

    def step(self, fast: Params, grads: Dict[str, Tensor], state: AdamState, step: int) -> Tuple[Params, AdamState]:
        b1, b2 = self.betas
        t = state.t + 1
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new, m, v = dict(fast), dict(state.m), dict(state.v)
        for n, g in grads.items():
            m[n] = b1 * state.m[n] + (1 - b1) * g
            v[n] = b2 * state.v[n] + (1 - b2) * g * g
            new[n] = fast[n] - self.lr * (m[n] / c1) / ((v[n] / c2).sqrt() + self.eps)
        return new, AdamState(m, v, t)


__all__ = ["LRSpec", "PerStepLR", "PerElementLR", "SGD", "Adam", "AdamState", "lr_of"]
