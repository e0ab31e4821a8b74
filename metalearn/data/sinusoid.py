"""Sinusoid regression tasks, generated on the device.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017, section 5.1: each task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0],
phase phi ~ U[0, pi] and inputs x ~ U[-5, 5]; K support points and Q query points per task.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms" (Reptile), 2018, use
the same family with phi ~ U[0, 2 pi] (`protocol="reptile"`).

The batch has the TaskBatch shape convention with ways = 1 and one-dimensional inputs:
support.x, support.y (T, K, 1) floats; query.x, query.y (T, Q, 1) floats.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..errors import MetalearnError
from ..types import Examples, TaskBatch
from .sampler import episode_seed

PROTOCOLS = {
    # name: (amplitude range, phase range, input range)
    "maml": ((0.1, 5.0), (0.0, math.pi), (-5.0, 5.0)),
    "reptile": ((0.1, 5.0), (0.0, 2 * math.pi), (-5.0, 5.0)),
}


def _protocol(protocol: str):
    if protocol not in PROTOCOLS:
        raise MetalearnError(f"sinusoid: unknown protocol {protocol!r}; known: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[protocol]


def _uniform(shape, lo: float, hi: float, g: torch.Generator, device, dtype) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device, dtype=dtype).mul_(hi - lo).add_(lo)


def _make_batch(amplitude, phase, shots: int, query_shots: int, g, device, dtype, x_range) -> TaskBatch:
    """amplitude, phase (T,) -> TaskBatch with x drawn U[x_range], y = A sin(x - phi)."""
    T = amplitude.shape[0]
    x = _uniform((T, shots + query_shots, 1), *x_range, g, device, dtype)  # (T, K+Q, 1)
    y = amplitude.view(T, 1, 1) * torch.sin(x - phase.view(T, 1, 1))     # (T, K+Q, 1)
    return TaskBatch(Examples(x[:, :shots], y[:, :shots]), Examples(x[:, shots:], y[:, shots:]),
                     ways=1, shots=shots, query_shots=query_shots)


class SinusoidSampler:
    """Meta-batches of sinusoid regression tasks from a seeded generator on `device`.

    After each `sample(T)`, `last_amplitude` and `last_phase` hold the (T,) task parameters.
    """

    def __init__(self, shots: int, query_shots: int, *, protocol: str = "maml", seed: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if shots < 1 or query_shots < 1:
            raise MetalearnError(f"sinusoid: shots and query_shots must be >= 1, got {shots} and {query_shots}")
        self.amplitude_range, self.phase_range, self.x_range = _protocol(protocol)
        self.shots, self.query_shots, self.protocol = shots, query_shots, protocol
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.last_amplitude: torch.Tensor | None = None
        self.last_phase: torch.Tensor | None = None

    def sample(self, num_tasks: int, part: slice | None = None) -> TaskBatch:
        """A meta-batch of `num_tasks` tasks, or only tasks `part` of it (a process's slice of the
        global meta-batch under torchrun). The whole batch is always drawn (a few hundred numbers), so
        the generator advances exactly as in a one-process run and the slice holds the same tasks."""
        g, dev, dt = self.generator, self.device, self.dtype
        self.last_amplitude = _uniform((num_tasks,), *self.amplitude_range, g, dev, dt)
        self.last_phase = _uniform((num_tasks,), *self.phase_range, g, dev, dt)
        batch = _make_batch(self.last_amplitude, self.last_phase, self.shots, self.query_shots, g, dev, dt,
                            self.x_range)
        if part is None:
            return batch
        self.last_amplitude, self.last_phase = self.last_amplitude[part], self.last_phase[part]
        return TaskBatch(Examples(batch.support.x[part], batch.support.y[part]),
                         Examples(batch.query.x[part], batch.query.y[part]), ways=1, shots=self.shots,
                         query_shots=self.query_shots)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_sinusoid_episodes(shots: int, query_shots: int, count: int, seed: int, batch_size: int = 50,
                            protocol: str = "maml", device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, start: int = 0) -> Iterator[TaskBatch]:
    """Episodes start..count-1 of the enumerated evaluation list fixed by `seed`: episode i depends
    only on (seed, i).

    Each episode is drawn on the CPU from its own generator (so the list is identical across
    batch sizes, devices and processes) and moved to `device`.
    """
    amp_r, ph_r, x_r = _protocol(protocol)
    for lo in range(start, count, batch_size):
        hi = min(count, lo + batch_size)
        amps, phases, xs = [], [], []
        for i in range(lo, hi):
            g = torch.Generator().manual_seed(episode_seed(seed, i))
            amps.append(_uniform((1,), *amp_r, g, "cpu", torch.float64))
            phases.append(_uniform((1,), *ph_r, g, "cpu", torch.float64))
            xs.append(_uniform((shots + query_shots, 1), *x_r, g, "cpu", torch.float64))
        a, p, x = torch.cat(amps), torch.cat(phases), torch.stack(xs)
        y = a.view(-1, 1, 1) * torch.sin(x - p.view(-1, 1, 1))
        x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
        yield TaskBatch(Examples(x[:, :shots], y[:, :shots]), Examples(x[:, shots:], y[:, shots:]),
                        ways=1, shots=shots, query_shots=query_shots)
