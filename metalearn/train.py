"""Meta-training, top to bottom: seeding, data, model, algorithm, optimiser, loop, eval, log, checkpoint."""
from __future__ import annotations

import math
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .algorithms import MAML
from .checkpoint import save_checkpoint
from .config import Config, to_dict
from .data import EpisodeSampler, check_episode_fits, open_dataset
from .errors import MetalearnError
from .evaluation import EvalResult, evaluate
from .inner import select
from .models import build_model
from .tracking import JsonlTracker
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


def build_algorithm(cfg: Config, model: torch.nn.Module) -> MAML:
    first_order = cfg.inner.first_order or cfg.outer.algorithm == "fomaml"
    return MAML(model, inner_lr=cfg.inner.lr, inner_steps=cfg.inner.steps, first_order=first_order,
                adapt=cfg.inner.adapt)


def make_run_dir(cfg: Config) -> Path:
    name = cfg.tracking.name or (f"{cfg.data.dataset}-{cfg.data.ways}w{cfg.data.shots}s-"
                                 f"{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out = Path(cfg.tracking.out_dir) / name
    if (out / "metrics.jsonl").exists():
        raise MetalearnError(f"run folder {out} already holds a run; choose another tracking.name")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: Config) -> Dict[str, Any]:
    # --- seeding and device -------------------------------------------------------------
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)

    # --- data: open (cheap), check every episode shape against the splits, then decode ----
    ds, splits = open_dataset(cfg.data)
    ev = eval_settings(cfg)
    check_episode_fits("train", len(splits["train"]), ds.samples_per_class, cfg.data.ways, cfg.data.shots, cfg.data.query_shots)
    if cfg.eval.val_every:
        check_episode_fits("val", len(splits["val"]), ds.samples_per_class, ev["ways"], ev["shots"], ev["query_shots"])
    check_episode_fits(cfg.eval.split, len(splits[cfg.eval.split]), ds.samples_per_class, ev["ways"], ev["shots"], ev["query_shots"])
    if ev["ways"] != cfg.data.ways:
        raise MetalearnError(f"eval.ways={ev['ways']} differs from data.ways={cfg.data.ways}, but MAML's head has one output per training way")
    out = make_run_dir(cfg)
    atomic_write(out / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg))), mode="w")
    images = ds.images.to(device)
    sampler = EpisodeSampler(images[splits["train"].to(device)], cfg.data.ways, cfg.data.shots, cfg.data.query_shots,
                             seed=cfg.seed, split="train", dtype=dtype)

    # --- model, algorithm, optimiser ----------------------------------------------------
    model = build_model(cfg.model, ds.channels, cfg.data.ways, cfg.data.image_size).to(device=device, dtype=dtype)
    algorithm = build_algorithm(cfg, model)
    trained = select([n for n, _ in model.named_parameters()], cfg.outer.train, what="outer.train")
    named = dict(model.named_parameters())
    optimizer = torch.optim.Adam([named[n] for n in trained], lr=cfg.outer.lr)

    def run_eval(split: str, episodes: int, progress: bool) -> EvalResult:
        return evaluate(algorithm, images[splits[split].to(device)], ways=ev["ways"], shots=ev["shots"],
                        query_shots=ev["query_shots"], episodes=episodes, seed=cfg.eval.seed,
                        inner_steps=ev["inner_steps"], inner_lr=ev["inner_lr"], batch_size=cfg.eval.batch_size,
                        split=split, batchnorm=cfg.model.batchnorm, dtype=dtype, progress=progress)

    # --- the loop -------------------------------------------------------------------------
    tracker = JsonlTracker(out / "metrics.jsonl")
    bar = tqdm(range(1, cfg.outer.iterations + 1), desc="meta-train", disable=not cfg.tracking.progress,
               dynamic_ncols=True)
    window, t_window, t_start = [], time.perf_counter(), time.perf_counter()
    for step in bar:
        batch = sampler.sample(cfg.outer.meta_batch_size)
        model.zero_grad(set_to_none=True)
        metrics = algorithm.meta_step(batch)
        if not math.isfinite(metrics["loss"]):
            raise MetalearnError(f"non-finite meta-loss {metrics['loss']} at step {step}; lower inner.lr or outer.lr")
        optimizer.step()
        window.append(metrics)
        if step % cfg.tracking.log_every == 0 or step == cfg.outer.iterations:
            now = time.perf_counter()
            row = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
            row["tasks_per_s"] = len(window) * cfg.outer.meta_batch_size / (now - t_window)
            tracker.log(step, {f"train/{k}": v for k, v in row.items()})
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}", tasks_s=f"{row['tasks_per_s']:.0f}")
            window, t_window = [], now
        if cfg.eval.val_every and step % cfg.eval.val_every == 0:
            val = run_eval("val", cfg.eval.val_episodes, progress=False)
            tracker.log(step, {"val/accuracy": val.mean, "val/ci95": val.ci95})
            bar.write(f"step {step}: {val.summary()}")
    bar.close()
    train_seconds = time.perf_counter() - t_start

    # --- checkpoint, final evaluation ---------------------------------------------------------
    save_checkpoint(out / "checkpoint.pt", step=cfg.outer.iterations, config=to_dict(cfg),
                    model=model.state_dict(), optimizer=optimizer.state_dict(), sampler=sampler.state_dict(),
                    rng={"torch": torch.get_rng_state()})
    result = run_eval(cfg.eval.split, cfg.eval.episodes, progress=cfg.tracking.progress)
    tracker.log(cfg.outer.iterations, {f"{cfg.eval.split}/accuracy": result.mean, f"{cfg.eval.split}/ci95": result.ci95})
    tracker.close()
    summary = {"run_dir": str(out), "train_seconds": round(train_seconds, 2), "eval": result.to_dict()}
    atomic_json(summary, out / f"eval-{cfg.eval.split}.json")
    return summary
