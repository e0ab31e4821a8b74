"""Checkpoints: written atomically, loaded with `torch.load(weights_only=True)`, resumed exactly.

A checkpoint is a plain dict of tensors and builtins (nothing that needs pickle's trust):

    {"format": 2,
     "step": int,                      # outer steps completed
     "config": dict,                   # the resolved Config (to_dict)
     "git": {"commit": str, "dirty": bool} | {},
     "model": state_dict,              # meta-parameters
     "optimizer": state_dict,          # outer optimiser (Adam moments, step counts)
     "algorithm": state_dict,          # e.g. learnable inner lrs, Reptile's inner Adam state and
                                       # mini-batch generator; {} when the algorithm has none
     "sampler": {"generator": ByteTensor,
                 "augment_batches": int},   # the latter only with data augmentation (data/augment.py)
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...], "numpy": {...}, "python": {...}},
     "tracking": {"wandb_id": str}}

Exact resume: restoring every state above and continuing from `step` gives, on CPU, final
parameters bit-identical to an uninterrupted run (tests/test_checkpoint_resume.py kills a
training process with SIGKILL and checks this). The write goes to a temp file in the same
folder, is fsynced, then renamed over the old file (`_io.atomic_write`), so a kill during a
save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import pickle
import random
import subprocess
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from ._io import atomic_torch_save
from .errors import MetalearnError

FORMAT = 2
CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    return atomic_torch_save({"format": FORMAT, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load a checkpoint file, or the checkpoint.pt inside a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise MetalearnError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a pickle that imports code; PyTorch's text advises weights_only=False: we do not
            raise MetalearnError(f"checkpoint {path} holds objects other than tensors and plain values, which are "
                                 f"refused for safety (it was not written by metalearn)") from None
        raise MetalearnError(f"checkpoint {path} is not a readable metalearn checkpoint ({_first_line(e)})") from None
    except Exception as e:
        raise MetalearnError(f"checkpoint {path} is not a readable metalearn checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise MetalearnError(f"checkpoint {path} is not a metalearn checkpoint (it holds a {type(ckpt).__name__}, "
                             f"not a dict)")
    if ckpt.get("format") != FORMAT:
        raise MetalearnError(f"checkpoint {path} is not a metalearn checkpoint (format {FORMAT})")
    for key, kind, what in [("step", int, "an int"), ("config", dict, "a dict"), ("model", dict, "a state dict")]:
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise MetalearnError(f"checkpoint {path} is incomplete: {key!r} is missing or not {what}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise MetalearnError(f"checkpoint {path} is incomplete: 'model' must map parameter names to tensors")
    return ckpt


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name (EOFError() has no message)."""
    advice = ("weights_only", "weights only", "file an issue", "documentation of torch.load")  # never repeat
    lines = [line.strip() for line in str(e).splitlines()  # PyTorch's advice to disable the safety check
             if line.strip() and not any(a in line.lower() for a in advice)]
    return lines[0] if lines else type(e).__name__


def nonfinite_tensor(state: Any, prefix: str = "") -> "str | None":
    """The name of the first floating-point tensor holding NaN or inf in a (nested) state dict, or None."""
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() and not bool(state.isfinite().all())
        return (prefix or "tensor") if bad else None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for k, v in items:
        bad = nonfinite_tensor(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


# --- random number generator states ------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    """Every global RNG state as tensors/builtins (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _git(where: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def git_info(where: str | Path | None = None) -> Dict[str, Any]:
    """{"commit": sha, "dirty": bool} of the git repository holding `where`; {} outside git. Without `where`:
    metalearn's own source checkout, and {} when metalearn is not run from one (a wheel installed into a
    virtual environment that happens to lie inside some repository does not get that repository's commit)."""
    package = Path(__file__).resolve().parent
    try:
        if where is None:
            where = package
            if Path(_git(package, "rev-parse", "--show-toplevel")).resolve() != package.parent:
                return {}
        commit = _git(Path(where), "rev-parse", "HEAD")
        status = _git(Path(where), "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(status)}


def metalearn_info() -> Dict[str, Any]:
    """{"version": installed version (package metadata; the source's __version__ without one), and "commit",
    "dirty" when metalearn runs from a git checkout}."""
    import sys
    from importlib import metadata

    try:
        version = metadata.version("metalearn")
    except metadata.PackageNotFoundError:  # the package (imported before any of its modules) is a higher layer
        version = sys.modules[__package__].__version__
    return {"version": version, **git_info()}


def provenance() -> Dict[str, Any]:
    """What run.json records about the code: {"metalearn": metalearn_info(), "workdir": {"path", "commit",
    "dirty"} of the git repository of the current working folder ({"path"} alone when it is not in one)}."""
    cwd = Path.cwd()
    work: Dict[str, Any] = {"path": str(cwd)}
    info = git_info(cwd)
    if info:
        try:
            work["path"] = _git(cwd, "rev-parse", "--show-toplevel")
        except (OSError, subprocess.SubprocessError):
            pass
        work.update(info)
    return {"metalearn": metalearn_info(), "workdir": work}
