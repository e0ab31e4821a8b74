"""Where metrics go: always `metrics.jsonl` in the run folder; Weights & Biases and TensorBoard when enabled.

Backends share one small protocol (`log(step, metrics)`, `summary(metrics)`, `close()`; optionally
`log_image(key, png, step)` and `log_text(key, text, step)`); `Trackers` fans out to several.
`import wandb` happens only inside `WandbTracker` and `torch.utils.tensorboard` only inside
`TensorboardTracker`, i.e. only when `tracking.wandb.enabled` / `tracking.tensorboard` is true.
The stdout side (tqdm bar with loss, accuracy, tasks/s and ETA) lives in the training loop.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence

from ._io import atomic_write
from .errors import MetalearnError


class Tracker(Protocol):
    def log(self, step: int, metrics: Dict[str, Any]) -> None: ...
    def summary(self, metrics: Dict[str, Any]) -> None: ...
    def close(self, ok: bool = True) -> None: ...


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class JsonlTracker:
    """Appends {"step": .., "time": .., **metrics} lines to `path`, flushed after each line.

    `keep_until=k` (resuming from a checkpoint at step k) first drops the rows of steps after k,
    which the interrupted process wrote after its last checkpoint and the resumed run repeats.
    """

    def __init__(self, path: str | Path, keep_until: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path, tolerant=True) if r.get("step", 0) <= keep_until]
            atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")
        self._f = open(self.path, "a", encoding="utf-8")
        self._t0 = time.time()

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time() - self._t0, 3)}
        row.update({k: _clean(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def summary(self, metrics: Dict[str, Any]) -> None:
        pass  # the final numbers are logged as rows and saved in eval-<split>.json

    def close(self, ok: bool = True) -> None:
        self._f.close()


class WandbTracker:
    """A Weights & Biases run: config, per-step metrics, summary, figures and the checkpoint artifact.

    `run_id` resumes an earlier W&B run (stored in the checkpoint). WANDB_MODE, if set, wins
    over `cfg.mode`; WANDB_DIR, if set, wins over the run folder as W&B's local directory.
    """

    def __init__(self, cfg, *, run_dir: Path, name: str, config: Dict[str, Any], run_id: Optional[str] = None):
        try:
            import wandb
        except ImportError:
            raise MetalearnError("tracking.wandb.enabled=true but wandb is not installed "
                                 "(pip install 'metalearn[wandb]')") from None
        self._wandb = wandb
        self.exit_code: Optional[int] = None
        """Set by the training loop before close() when a signal stopped the run (130/143)."""
        mode = os.environ.get("WANDB_MODE") or cfg.mode
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity or None, group=cfg.group or None, tags=list(cfg.tags) or None,
                name=name, config=config,
                dir=os.environ.get("WANDB_DIR") or str(run_dir),  # read per run, not once per process
                mode=mode, id=run_id, resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # no network, no API key, ...: one line, not wandb's traceback
            why = " ".join(str(e).split())[:200].rstrip(".") or type(e).__name__
            raise MetalearnError(f"W&B ({mode}) could not start the run: {why}; check the network and your API key "
                                 f"(wandb login), or use tracking.wandb.mode=offline") from None
        self.id = self.run.id
        self.offline_dir: Optional[Path] = None
        """The offline run's folder (offline-run-<time>-<id>), announced at close with its `wandb sync` command."""
        if mode == "offline":
            try:
                self.offline_dir = Path(self.run.dir).parent  # .../wandb/offline-run-*/files -> offline-run-*
            except Exception:
                self.offline_dir = None

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        self.run.log({k: _clean(v) for k, v in metrics.items()}, step=step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        self.run.summary.update({k: _clean(v) for k, v in metrics.items()})

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def log_checkpoint(self, path: str | Path, name: str, metadata: Dict[str, Any]) -> None:
        art = self._wandb.Artifact(name, type="model", metadata=metadata)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def log_text(self, key: str, text: str, step: int) -> None:
        pass  # the evaluation is in the run's summary already

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=self.exit_code if self.exit_code is not None else 0 if ok else 1)
        if self.offline_dir is not None:
            print(f"W&B offline run written to {self.offline_dir}; upload it with\n  wandb sync {self.offline_dir}",
                  file=sys.stderr)


class TensorboardTracker:
    """TensorBoard event files in `log_dir` (the run folder's tensorboard/): every logged metric as a scalar,
    the learning-curve figure as an image, the evaluation result as text (its numbers are scalars too).
    `torch.utils.tensorboard` (which needs the tensorboard package) is imported only here."""

    def __init__(self, log_dir: str | Path, config: Optional[Dict[str, Any]] = None, purge_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MetalearnError("tracking.tensorboard=true but the tensorboard package is not installed "
                                 "(pip install tensorboard)") from None
        self.log_dir = Path(log_dir)
        # purge_step (resuming from a checkpoint at step k): TensorBoard hides the events after k that the
        # interrupted process wrote, as JsonlTracker drops those rows
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        if config is not None and purge_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        pass  # the final numbers are logged as scalars (and as text by log_text)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(key, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def log_text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, text, step)

    def close(self, ok: bool = True) -> None:
        self.writer.flush()
        self.writer.close()


class Trackers:
    """Fans every call out to several trackers; `wandb` is the W&B tracker or None."""

    def __init__(self, trackers: Sequence[Tracker], wandb: Optional[WandbTracker] = None):
        self.trackers, self.wandb = list(trackers), wandb

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def summary(self, metrics: Dict[str, Any]) -> None:
        for t in self.trackers:
            t.summary(metrics)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """The PNG at `path` to the trackers that take images (W&B, TensorBoard)."""
        for t in self.trackers:
            if hasattr(t, "log_image"):
                t.log_image(key, path, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        """A text (e.g. the evaluation result) to the trackers that take text (TensorBoard)."""
        for t in self.trackers:
            if hasattr(t, "log_text"):
                t.log_text(key, text, step)

    def close(self, ok: bool = True) -> None:
        for t in self.trackers:
            t.close(ok)


def read_jsonl(path: str | Path, tolerant: bool = False) -> List[dict]:
    """Rows of a metrics.jsonl; `tolerant` skips a torn last line (a process killed mid-write)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not tolerant:
                    raise
    return rows


def plot_learning_curve(rows: List[dict], path: str | Path, title: str = "") -> Path:
    """Training loss and accuracy (and validation accuracy ± 95% CI, if logged) against the step, as a PNG.

    Meta-training rows are query losses/accuracies per outer step; supervised pre-training rows
    (they log `train/images_per_s`) are mini-batch losses per pre-training step, and are labelled so.
    Regression (MSE as both loss and metric) gets one panel, not two identical ones. `title` (the run
    name, its key settings and the final test result) goes above the panels. A curve of one logged
    point is drawn as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    train = [r for r in rows if r.get("train/loss") is not None]
    metric = "mse" if any("train/mse" in r for r in train) else "accuracy"  # sinusoid regression logs MSE
    val = [r for r in rows if r.get(f"val/{metric}") is not None]
    pretrain = any("train/images_per_s" in r for r in train)
    xlabel, what = ("pre-training step", "train mini-batch") if pretrain else ("outer step", "train query")
    same = metric == "mse" and all(r.get("train/mse") == r.get("train/loss") for r in train)
    fig, axes = plt.subplots(1, 1 if same else 2, figsize=(5.5 if same else 10, 3.8), squeeze=False)
    ax_loss, ax_acc = axes[0][0], axes[0][-1]

    def marker(points: list) -> dict:
        return {"marker": "o"} if len(points) <= 20 else {}

    if not same:
        ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], label=f"{what} loss",
                     **marker(train))
        ax_loss.set_ylabel("loss")
    ax_acc.plot([r["step"] for r in train], [r[f"train/{metric}"] for r in train], label=f"{what} {metric}",
                **marker(train))
    if val:
        s = [r["step"] for r in val]
        m = [r[f"val/{metric}"] for r in val]
        c = [r.get("val/ci95") or 0.0 for r in val]
        line, = ax_acc.plot(s, m, marker="o", label=f"val {metric} (± 95% CI)")
        ax_acc.fill_between(s, [a - b for a, b in zip(m, c)], [a + b for a, b in zip(m, c)], alpha=0.25,
                            color=line.get_color())
    ax_acc.set_ylabel(metric)
    for ax in {id(a): a for a in (ax_loss, ax_acc)}.values():
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def curve_title(run_name: str, settings: str, result: str = "") -> str:
    """The learning curve's title: run name, key settings, and the final test result when known."""
    return "\n".join(x for x in (f"{run_name}: {settings}" if settings else run_name, result) if x)
