"""The run folder, tracking.out_dir/tracking.name: what a training run keeps, and how it is resumed.

    config.yaml          the resolved config                        written when the run starts
    run.json             the code, command, torch version, start    (run_record)
    metrics.jsonl        every logged row; tensorboard/, wandb/ when enabled (metalearn/tracking.py)
    checkpoint.pt        the last checkpoint, atomic (metalearn/checkpoint.py); --resume continues it exactly
    learning_curve.png   after the final evaluation, titled with its result
    eval-<split>.json    the final evaluation (per-episode scores, mean ± 95% CI)

`RunFolder.open(cfg, resume)` checks the folder before any work: it must be writable, a fresh run
must not overwrite another one, a resumed one must keep its training setup; the temp files a killed
process left are removed. Then the training loop (metalearn/train.py) restores the checkpoint or
creates the folder, opens the trackers, and saves checkpoints; a finished run's saved result is
returned on --resume without training, evaluating or logging again.

Under torchrun rank 0 alone writes; every process gets rank 0's verdicts.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from . import distributed
from ._io import atomic_json, atomic_write, check_writable_folder
from .checkpoint import (CHECKPOINT_NAME, git_info, load_checkpoint, nonfinite_tensor, provenance, rng_state,
                         save_checkpoint, set_rng_state)
from .config import Config, from_dict, to_dict
from .errors import MetalearnError
from .tracking import JsonlTracker, TensorboardTracker, Trackers, WandbTracker

_RESUMABLE_CHANGES = ("tracking.", "checkpoint.", "eval.", "device", "threads")
"""Config keys a resumed run may change. Not outer.iterations: schedules (reptile, mamlpp) depend on it."""

_STALE_TMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""Temp files of `_io.atomic_write` (mkstemp: '.<name>.<8 chars>.tmp'); a kill before the rename leaves one."""


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config dict as {"outer.lr": 0.001, ...}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(cfg: Config, saved: Dict[str, Any]) -> None:
    """Refuse a resume whose config changes the training setup (anything but _RESUMABLE_CHANGES)."""
    now, then = _flatten(to_dict(cfg)), _flatten(to_dict(from_dict(saved)))  # keys added since: defaults
    for key in sorted(set(now) | set(then)):
        if now.get(key) != then.get(key) and not key.startswith(_RESUMABLE_CHANGES):
            raise MetalearnError(f"--resume: {key} is {now.get(key)!r} but the checkpoint was trained with "
                                 f"{then.get(key)!r}; a resumed run must keep the training setup")


def remove_stale_tmp(out: Path) -> None:
    """Delete the temp files that killed writers left in the run folder `out` (never anything else)."""
    if not out.is_dir():
        return
    for f in out.iterdir():
        if _STALE_TMP.fullmatch(f.name) and f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)


def open_run_dir(cfg: Config, resume: bool) -> "tuple[Path, Optional[Dict[str, Any]]]":
    """(run folder, checkpoint to resume or None). Checks, and removes the temp files a killed process
    left in the run folder; creates nothing."""
    out = Path(cfg.tracking.out_dir) / cfg.tracking.name
    ckpt_path = out / CHECKPOINT_NAME
    check_writable_folder(out, "tracking.out_dir")  # under a regular file, or read-only: before any work
    remove_stale_tmp(out)
    if resume:
        if ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path)
            _check_resumable(cfg, ckpt["config"])
            return out, ckpt
        if not out.is_dir():
            raise MetalearnError(f"--resume: run folder {out} does not exist")
        return out, None  # killed before its first checkpoint: start over in the same folder
    if (out / "metrics.jsonl").exists() or ckpt_path.exists():
        raise MetalearnError(f"run folder {out} already holds a run; choose another tracking.name or pass --resume")
    return out, None


def finished_result(out: Path, ckpt: Optional[Dict[str, Any]], cfg: Config, total: int) -> Optional[Dict[str, Any]]:
    """The saved evaluation summary of a run that already trained all its `total` steps and was evaluated,
    else None (also when eval-<split>.json is torn or unreadable: it is evaluated again)."""
    path = out / f"eval-{cfg.eval.split}.json"
    if ckpt is None or ckpt["step"] < total or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("eval"), dict):
        return None
    return {**saved, "run_dir": str(out), "interrupted": None, "step": ckpt["step"], "finished": True}


def run_record(git: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """run.json: the code (metalearn's version and source commit, the working folder's repository and commit),
    the command, torch's version and the start time."""
    return {"git": git, **provenance(), "argv": sys.argv, "torch": torch.__version__,
            "started": datetime.now().isoformat(), **extra}


class RunFolder:
    """One training run's folder (see the module docstring).

    checkpoint: the checkpoint to resume (rank 0's, on every process), or None for a fresh start.
    saved_step: the step of the last checkpoint in the folder (None before the first), for error messages.
    """

    def __init__(self, cfg: Config, path: Path, checkpoint: Optional[Dict[str, Any]], *, resume: bool,
                 record: Dict[str, Any], dist: distributed.Context):
        self.cfg, self.path, self.checkpoint, self.resume, self.dist = cfg, path, checkpoint, resume, dist
        self.record = record
        self.saved_step: Optional[int] = checkpoint["step"] if checkpoint is not None else None
        self.git = git_info() if dist.is_main else {}
        self.wandb: Optional[WandbTracker] = None
        self._wandb_id: Optional[str] = None
        self._created: Optional[Path] = None  # the topmost folder this run created (removed if W&B cannot start)
        self._fresh_folder = False

    @classmethod
    def open(cls, cfg: Config, resume: bool, *, dist: Optional[distributed.Context] = None,
             **record: Any) -> "RunFolder":
        """Check the run folder (rank 0; see `open_run_dir`); `record`: what run.json holds besides run_record's."""
        dist = dist or distributed.context()
        path, ckpt = distributed.on_main(lambda: open_run_dir(cfg, resume), dist)
        return cls(cfg, path, ckpt, resume=resume, record=record, dist=dist)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    def finished(self, total: int) -> Optional[Dict[str, Any]]:
        """A resumed run that trained its `total` steps and was evaluated: its saved result, else None."""
        return distributed.on_main(lambda: finished_result(self.path, self.checkpoint, self.cfg, total), self.dist)

    def kept(self) -> str:
        """Which checkpoint survives a run stopped by a non-finite value (metalearn/guards.py)."""
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint (step {self.saved_step}) is kept in {self.checkpoint_path}"

    # --- start: the checkpoint's state restored exactly, or a fresh folder ---------------------------
    def restore(self, state: Any) -> int:
        """Load the checkpoint into `state` (its load_state_dict takes the checkpoint dict) and the RNGs; the
        step to continue from. A checkpoint that does not fit, or holds a non-finite parameter, is one line."""
        ckpt = self.checkpoint
        try:
            state.load_state_dict(ckpt)
            set_rng_state(ckpt["rng"])
            start = ckpt["step"]
            self._wandb_id = (ckpt.get("tracking") or {}).get("wandb_id")
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise MetalearnError(f"--resume: {self.checkpoint_path} does not fit this run "
                                 f"({type(e).__name__}: {why})") from None
        bad = nonfinite_tensor(ckpt["model"])
        if bad is not None:
            raise MetalearnError(f"--resume: {self.checkpoint_path} holds a non-finite parameter ({bad})")
        return start

    def create(self) -> int:
        """Create the folder with config.yaml and run.json (rank 0); the step to start from: 0."""
        out = self.path
        created = out
        while not created.parent.exists() and created.parent != created:
            created = created.parent
        self._created, self._fresh_folder = created, not out.exists()

        def write() -> None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(self.cfg))),
                         mode="w")
            atomic_json(run_record(self.git, **self.record), out / "run.json")
        distributed.on_main(write, self.dist)
        return 0

    # --- trackers: metrics.jsonl always, TensorBoard and W&B when enabled (rank 0 only) -------------
    def open_trackers(self, start: int) -> Trackers:
        """The run's trackers (rank 0; nowhere on the others). If one cannot start (e.g. W&B offline without
        a key), a fresh run's folder is removed again, so that nothing blocks a re-run under the same name."""
        tracker = distributed.main_only(lambda: self._open_trackers_or_clean_up(start), self.dist)
        return tracker or Trackers([])

    def _open_trackers(self, start: int) -> Trackers:
        cfg, out, resume = self.cfg, self.path, self.resume
        trackers: List[Any] = [JsonlTracker(out / "metrics.jsonl", keep_until=start if resume else None)]
        if cfg.tracking.tensorboard:  # local and cheap: before W&B, so that a missing package starts nothing
            trackers.append(TensorboardTracker(out / "tensorboard", config=to_dict(cfg),
                                               purge_step=start + 1 if resume and start else None))
        if cfg.tracking.wandb.enabled:
            self.wandb = WandbTracker(cfg.tracking.wandb, run_dir=out, name=cfg.tracking.name, config=to_dict(cfg),
                                      run_id=self._wandb_id)
            trackers.append(self.wandb)
        return Trackers(trackers, self.wandb)

    def _open_trackers_or_clean_up(self, start: int) -> Trackers:
        try:
            return self._open_trackers(start)
        except BaseException:
            if self.checkpoint is None and not self.resume:
                if self._fresh_folder:
                    shutil.rmtree(self._created, ignore_errors=True)
                else:
                    for name in ("config.yaml", "run.json", "metrics.jsonl"):
                        (self.path / name).unlink(missing_ok=True)
            raise

    # --- checkpoints -----------------------------------------------------------------------------
    def save(self, step: int, state: Dict[str, Any]) -> None:
        """Write checkpoint.pt atomically (rank 0): the step, config, git commit, `state` (model, optimiser,
        algorithm, sampler, ...), every RNG state and the W&B run id."""
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_path, step=step, config=to_dict(self.cfg), git=self.git, **state,
                            rng=rng_state(), tracking={"wandb_id": self.wandb.id if self.wandb else None})
        self.saved_step = step


__all__ = ["RunFolder", "finished_result", "open_run_dir", "remove_stale_tmp", "run_record"]
