"""What stops a training run, and how it stops safely.

Signals. SIGINT/SIGTERM while training (`StopSignals`): the current step finishes, a checkpoint is
saved, the run returns `interrupted` and the command exits 130/143; a second signal interrupts at
once. During the final evaluation there is no step to finish (`RaiseOnSignals`): the signal raises
`SignalStop` at once, and `--resume` evaluates the saved checkpoint.

Non-finite values. A NaN/inf loss or gradient stops the run before the update is applied
(`nonfinite_step`); an update that overflows, or leaves a NaN/inf parameter or optimiser state,
stops it before anything is saved (`guarded_step`). Either way the last good checkpoint stays, and
the one-line error names the step, which checkpoint is kept and what to lower.
"""
from __future__ import annotations

import math
import signal
import threading
from typing import Any, Callable, Dict, Optional

import torch

from .checkpoint import nonfinite_tensor
from .errors import MetalearnError


class StopSignals:
    """SIGINT/SIGTERM while training: `received` names the signal; the loop finishes the current step,
    checkpoints and stops. A second signal interrupts at once (KeyboardInterrupt). Handlers are
    installed only in the main thread and restored on exit."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class SignalStop(BaseException):
    """SIGINT/SIGTERM during the final evaluation (see `RaiseOnSignals`); `name` is the signal's."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class RaiseOnSignals(StopSignals):
    """SIGINT/SIGTERM raise `SignalStop` at once (the final evaluation: there is no step to finish)."""

    def _handle(self, signum: int, frame: Any) -> None:
        raise SignalStop(signal.Signals(signum).name)


def exit_code(signal_name: str) -> int:
    """The exit status of a run stopped by `signal_name`: 130 for SIGINT, 143 for SIGTERM."""
    return 130 if signal_name == "SIGINT" else 143


def nonfinite_step(metrics: Dict[str, float], params: Dict[str, torch.Tensor]) -> Optional[str]:
    """What is NaN/inf after a step's backward pass (the loss, or a parameter's gradient), or None."""
    if not math.isfinite(metrics["loss"]):
        return f"meta-loss ({metrics['loss']})"
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    if grads and not bool(torch.stack([g.isfinite().all() for g in grads.values()]).all()):
        return "gradient of " + next(n for n, g in grads.items() if not bool(g.isfinite().all()))
    return None


def _nonfinite_after_update(params: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> Optional[str]:
    """What is NaN/inf after an update (a parameter, or the optimiser's state), or None."""
    tensors = [*params.values(), *(t for st in optimizer.state.values() for t in st.values()
                                   if isinstance(t, torch.Tensor) and t.is_floating_point())]
    if bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        return None
    return ("parameter " + bad) if (bad := nonfinite_tensor(params)) else "optimiser state"


def guarded_step(optimizer: torch.optim.Optimizer, params: Dict[str, torch.Tensor], *, where: str, hint: str,
                 kept: Callable[[], str]) -> None:
    """optimizer.step(), refusing a non-finite outcome: an overflow inside the step (e.g. Adam's "value
    cannot be converted to type float without overflow") or a NaN/inf parameter or optimiser state
    afterwards stops with one line naming `where`; nothing of it is ever saved. kept() says which
    checkpoint survives (RunFolder.kept)."""
    try:
        optimizer.step()
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise MetalearnError(f"the {where} overflows ({' '.join(str(e).split())}); {kept()}. {hint}") from None
    bad = _nonfinite_after_update(params, optimizer)
    if bad is not None:  # never saved: the last good checkpoint stays
        raise MetalearnError(f"non-finite {bad} after the {where}; stopped without saving it, {kept()}. {hint}")


__all__ = ["RaiseOnSignals", "SignalStop", "StopSignals", "exit_code", "guarded_step", "nonfinite_step"]
