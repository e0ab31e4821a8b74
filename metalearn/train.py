"""Meta-training, top to bottom: seeding, data, model, algorithm, optimiser, loop, eval, log, checkpoint."""
from __future__ import annotations

import copy
import math
import random
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .algorithms import MAML
from .checkpoint import CHECKPOINT_NAME, git_info, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, from_dict, to_dict
from .data import EpisodeSampler, check_episode_fits, open_dataset
from .errors import MetalearnError
from .evaluation import EvalResult, evaluate
from .inner import select
from .models import build_model
from .tracking import JsonlTracker, Trackers, WandbTracker, plot_learning_curve, read_jsonl
from ._io import atomic_json, atomic_write


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MetalearnError(f"device={name} but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def eval_settings(cfg: Config) -> Dict[str, Any]:
    """The evaluation protocol with defaults filled in from training."""
    return dict(ways=cfg.eval.ways or cfg.data.ways, shots=cfg.eval.shots or cfg.data.shots,
                query_shots=cfg.eval.query_shots,
                inner_steps=cfg.inner.steps if cfg.eval.inner_steps is None else cfg.eval.inner_steps,
                inner_lr=cfg.inner.lr if cfg.eval.inner_lr is None else cfg.eval.inner_lr)


def build_algorithm(cfg: Config, model: torch.nn.Module):
    """The algorithm named by outer.algorithm (see metalearn/algorithms/), on `model`."""
    from .algorithms import ALGORITHMS

    name = cfg.outer.algorithm
    loss = "mse" if cfg.data.dataset == "sinusoid" else "cross_entropy"
    if name == "protonet":
        return ALGORITHMS[name](model, loss=loss)
    common = dict(inner_lr=cfg.inner.lr, inner_steps=cfg.inner.steps, loss=loss)
    adapt_default = {"anil": ["head.*"], "boil": ["features.*"]}.get(name)
    adapt = adapt_default if (adapt_default and list(cfg.inner.adapt) == ["*"]) else list(cfg.inner.adapt)
    if name == "reptile":
        return ALGORITHMS[name](model, adapt=adapt, final_lr=cfg.outer.final_lr or 0.0, **common)
    first_order = cfg.inner.first_order or name == "fomaml"
    if name == "mamlpp":
        return ALGORITHMS[name](model, adapt=adapt, first_order=first_order, msl_iterations=cfg.outer.msl_iterations,
                                first_order_until=cfg.outer.first_order_until, final_lr=cfg.outer.final_lr or 0.0,
                                **common)
    return ALGORITHMS[name](model, adapt=adapt, first_order=first_order, **common)


def check_data(cfg: Config) -> "tuple[Any, Dict[str, torch.Tensor]]":
    """Open the data set (cheap: nothing decoded yet) and check every episode shape the run will draw."""
    ds, splits = open_dataset(cfg.data)
    ev = eval_settings(cfg)
    check_episode_fits("train", len(splits["train"]), ds.samples_per_class, cfg.data.ways, cfg.data.shots, cfg.data.query_shots)
    if cfg.eval.val_every:
        check_episode_fits("val", len(splits["val"]), ds.samples_per_class, ev["ways"], ev["shots"], ev["query_shots"])
    check_episode_fits(cfg.eval.split, len(splits[cfg.eval.split]), ds.samples_per_class, ev["ways"], ev["shots"], ev["query_shots"])
    if ev["ways"] != cfg.data.ways and cfg.outer.algorithm != "protonet":
        raise MetalearnError(f"eval.ways={ev['ways']} differs from data.ways={cfg.data.ways}, but MAML's head has one output per training way")
    return ds, splits


_RESUMABLE_CHANGES = ("tracking.", "checkpoint.", "eval.", "device", "threads")
"""Config keys a resumed run may change. Not outer.iterations: schedules (reptile, mamlpp) depend on it."""


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(cfg: Config, saved: Dict[str, Any]) -> None:
    now, then = _flatten(to_dict(cfg)), _flatten(to_dict(from_dict(saved)))  # keys added since: defaults
    for key in sorted(set(now) | set(then)):
        if now.get(key) != then.get(key) and not key.startswith(_RESUMABLE_CHANGES):
            raise MetalearnError(f"--resume: {key} is {now.get(key)!r} but the checkpoint was trained with "
                                 f"{then.get(key)!r}; a resumed run must keep the training setup")


def open_run_dir(cfg: Config, resume: bool) -> "tuple[Path, Optional[Dict[str, Any]]]":
    """(run folder, checkpoint to resume or None). Only checks; creates nothing."""
    out = Path(cfg.tracking.out_dir) / cfg.tracking.name
    ckpt_path = out / CHECKPOINT_NAME
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


class _StopSignals:
    """SIGINT/SIGTERM while training: finish the current step, checkpoint, stop cleanly.

    A second signal interrupts at once (KeyboardInterrupt). Handlers are installed only in the
    main thread and restored on exit.
    """

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _nonfinite(metrics: Dict[str, float], params: Dict[str, torch.Tensor]) -> Optional[str]:
    """What is NaN/inf after a meta-step (the loss or a parameter's gradient), or None."""
    if not math.isfinite(metrics["loss"]):
        return f"meta-loss ({metrics['loss']})"
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    if grads and not bool(torch.stack([g.isfinite().all() for g in grads.values()]).all()):
        return "gradient of " + next(n for n, g in grads.items() if not bool(g.isfinite().all()))
    return None


def train(cfg: Config, *, resume: bool = False) -> Dict[str, Any]:
    """Meta-train `cfg`, checkpointing as it goes, then evaluate on the fixed episodes of `eval.split`.

    resume: continue from `tracking.out_dir/tracking.name/checkpoint.pt` (bit-identical on CPU to a run
    that was never interrupted). Returns a summary dict; `summary["interrupted"]` names the signal
    (SIGINT/SIGTERM) when the run stopped early after saving a checkpoint.
    """
    cfg = copy.deepcopy(cfg)
    if not cfg.tracking.name:
        if resume:
            raise MetalearnError("--resume needs the run's name: pass the run's config.yaml or tracking.name=...")
        cfg.tracking.name = f"{cfg.data.dataset}-{cfg.data.ways}w{cfg.data.shots}s-{datetime.now().strftime('%Y%m%d-%H%M%S')}"

    # --- seeding and device -------------------------------------------------------------
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)

    # --- data: open (cheap), check every episode shape against the splits, then decode ----
    ds, splits = check_data(cfg)
    ev = eval_settings(cfg)
    out, ckpt = open_run_dir(cfg, resume)
    images = ds.images.to(device)
    sampler = EpisodeSampler(images[splits["train"].to(device)], cfg.data.ways, cfg.data.shots, cfg.data.query_shots,
                             seed=cfg.seed, split="train", dtype=dtype, rotate=cfg.data.rotation == "per_task")

    # --- model, algorithm, optimiser ----------------------------------------------------
    model = build_model(cfg.model, ds.channels, cfg.data.ways, cfg.data.image_size).to(device=device, dtype=dtype)
    algorithm = build_algorithm(cfg, model)
    trained = select([n for n, _ in model.named_parameters()], cfg.outer.train, what="outer.train")
    named = dict(model.named_parameters())
    optimizer = algorithm.outer_optimizer([named[n] for n in trained], cfg.outer.lr)  # Adam (+ learned lrs); SGD for reptile
    learnables = algorithm.meta_parameters() if hasattr(algorithm, "meta_parameters") else []
    checked = {**{n: named[n] for n in trained}, **{f"{cfg.outer.algorithm} learnable {i}": p for i, p in enumerate(learnables)}}

    # --- run folder: a fresh one, or the checkpoint's state restored exactly ----------------
    git = git_info()
    start, wandb_id = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("algorithm") and hasattr(algorithm, "load_state_dict"):
            algorithm.load_state_dict(ckpt["algorithm"])
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        start, wandb_id = ckpt["step"], ckpt.get("tracking", {}).get("wandb_id")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg))), mode="w")
        atomic_json({"git": git, "argv": sys.argv, "torch": torch.__version__, "started": datetime.now().isoformat()},
                    out / "run.json")

    def run_eval(split: str, episodes: int, progress: bool) -> EvalResult:
        return evaluate(algorithm, images[splits[split].to(device)], ways=ev["ways"], shots=ev["shots"],
                        query_shots=ev["query_shots"], episodes=episodes, seed=cfg.eval.seed,
                        inner_steps=ev["inner_steps"], inner_lr=ev["inner_lr"], batch_size=cfg.eval.batch_size,
                        split=split, batchnorm=cfg.model.batchnorm, dtype=dtype, progress=progress,
                        transductive=cfg.eval.transductive)

    # --- trackers: metrics.jsonl always, W&B when enabled ---------------------------------
    trackers = [JsonlTracker(out / "metrics.jsonl", keep_until=start if resume else None)]
    wandb_run = None
    if cfg.tracking.wandb.enabled:
        wandb_run = WandbTracker(cfg.tracking.wandb, run_dir=out, name=cfg.tracking.name, config=to_dict(cfg),
                                 run_id=wandb_id)
        trackers.append(wandb_run)
    tracker = Trackers(trackers, wandb_run)

    def save(step: int) -> Path:
        algo_state = algorithm.state_dict() if hasattr(algorithm, "state_dict") else {}
        return save_checkpoint(out / CHECKPOINT_NAME, step=step, config=to_dict(cfg), git=git,
                               model=model.state_dict(), optimizer=optimizer.state_dict(), algorithm=algo_state,
                               sampler=sampler.state_dict(), rng=rng_state(),
                               tracking={"wandb_id": wandb_run.id if wandb_run else None})

    # --- the loop -------------------------------------------------------------------------
    total = cfg.outer.iterations
    if start:
        print(f"resuming {out} from step {start} of {total}", file=sys.stderr)
    bar = tqdm(total=total, initial=start, desc="meta-train", disable=not cfg.tracking.progress, dynamic_ncols=True)
    window, t_window, t_start = [], time.perf_counter(), time.perf_counter()
    saved_step, step, ok = (start if ckpt is not None else None), start, False
    try:
        with _StopSignals() as stop:
            for step in range(start + 1, total + 1):
                batch = sampler.sample(cfg.outer.meta_batch_size)
                model.zero_grad(set_to_none=True)
                optimizer.zero_grad(set_to_none=True)  # also the algorithm's learnables (metasgd alpha, mamlpp lrs)
                algorithm.schedule(step, total, optimizer)  # annealing: reptile's epsilon, MAML++'s schedules
                metrics = algorithm.meta_step(batch)
                bad = _nonfinite(metrics, checked)
                if bad is not None:
                    kept = (f"the last good checkpoint (step {saved_step}) is kept in {out / CHECKPOINT_NAME}"
                            if saved_step is not None else "no checkpoint had been written yet")
                    raise MetalearnError(f"non-finite {bad} at step {step}; stopped without applying it, {kept}. "
                                         f"Lower inner.lr or outer.lr")
                optimizer.step()
                bar.update(1)
                window.append(metrics)
                if step % cfg.tracking.log_every == 0 or step == total:
                    now = time.perf_counter()
                    row = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                    row["tasks_per_s"] = len(window) * cfg.outer.meta_batch_size / (now - t_window)
                    tracker.log(step, {f"train/{k}": v for k, v in row.items()})
                    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row.get('accuracy', row.get('mse', float('nan'))):.3f}", tasks_s=f"{row['tasks_per_s']:.0f}")
                    window, t_window = [], now
                if cfg.eval.val_every and step % cfg.eval.val_every == 0:
                    val = run_eval("val", cfg.eval.val_episodes, progress=False)
                    tracker.log(step, {"val/accuracy": val.mean, "val/ci95": val.ci95})
                    bar.write(f"step {step}: {val.summary()}")
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == total or stop.received:
                    save(step)
                    saved_step = step
                if stop.received:
                    break
        bar.close()
        train_seconds = time.perf_counter() - t_start
        if saved_step != step:  # e.g. resuming a run that had already finished
            save(step)
        if stop.received:
            ok = True
            return {"run_dir": str(out), "interrupted": stop.received, "step": step,
                    "train_seconds": round(train_seconds, 2), "eval": None}

        # --- learning curve, final evaluation, artifact -----------------------------------------
        curve = plot_learning_curve(read_jsonl(out / "metrics.jsonl", tolerant=True), out / "learning_curve.png")
        result = run_eval(cfg.eval.split, cfg.eval.episodes, progress=cfg.tracking.progress)
        final = {f"{cfg.eval.split}/accuracy": result.mean, f"{cfg.eval.split}/ci95": result.ci95}
        tracker.log(total, final)
        tracker.summary({**final, f"{cfg.eval.split}/episodes": result.episodes})
        summary = {"run_dir": str(out), "interrupted": None, "step": total, "train_seconds": round(train_seconds, 2),
                   "eval": result.to_dict()}
        atomic_json(summary, out / f"eval-{cfg.eval.split}.json")
        if wandb_run is not None:
            wandb_run.log_image("learning_curve", curve, step=total)
            if cfg.tracking.wandb.log_checkpoint:
                wandb_run.log_checkpoint(out / CHECKPOINT_NAME, name=f"checkpoint-{wandb_run.id}",
                                         metadata={"step": total, **final})
        ok = True
        return summary
    finally:
        bar.close()
        tracker.close(ok)
