"""Meta-training, top to bottom: seeding, data, model, algorithm, optimiser, loop, eval, log, checkpoint.

Classification on image data sets (N-way K-shot episodes, accuracy) or sinusoid regression
(data.dataset=sinusoid: MAML's Sec. 5.1 tasks, an MLP, MSE). Under torchrun every process runs
this same loop on its slice of each meta-batch (metalearn/distributed.py); rank 0 alone writes.
"""
from __future__ import annotations

import copy
import math
import random
import re
import shutil
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (CHECKPOINT_NAME, git_info, load_checkpoint, nonfinite_tensor, provenance, rng_state,
                         save_checkpoint, set_rng_state)
from .config import Config, from_dict, to_dict
from .data import REGRESSION, EpisodeSampler, SinusoidSampler, check_episode_fits, open_dataset
from .errors import MetalearnError
from .precision import meta_step_context, set_precision
from .evaluation import EvalResult, evaluate, plural
from .inner import select
from .models import build_model
from .tracking import (JsonlTracker, TensorboardTracker, Trackers, WandbTracker, curve_title, plot_learning_curve,
                       read_jsonl)
from ._io import atomic_json, atomic_write, check_writable_folder


def resolve_device(name: str) -> torch.device:
    """The run's device; under torchrun with CUDA, this process's GPU (cuda:LOCAL_RANK)."""
    ctx = distributed.context()
    if ctx.enabled and ctx.device is not None:
        return torch.device(ctx.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MetalearnError(f"device={name} but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_and_device(cfg: Config) -> "tuple[torch.device, torch.dtype]":
    """Seed every generator with cfg.seed, apply cfg.threads; (device, dtype) of the run."""
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device), getattr(torch, cfg.dtype)


def eval_settings(cfg: Config) -> Dict[str, Any]:
    """The evaluation protocol with defaults filled in from training."""
    return dict(ways=cfg.eval.ways or cfg.data.ways, shots=cfg.eval.shots or cfg.data.shots,
                query_shots=cfg.eval.query_shots,
                inner_steps=cfg.inner.steps if cfg.eval.inner_steps is None else cfg.eval.inner_steps,
                inner_lr=cfg.inner.lr if cfg.eval.inner_lr is None else cfg.eval.inner_lr)


def run_settings(cfg: Config) -> str:
    """The key settings of a run, for the learning curve's title: "maml, 5-way 1-shot, 1 inner step (lr 0.4),
    meta-batch 32, 60000 outer steps, seed 0"."""
    episode = (f"sinusoid {cfg.data.shots}-shot" if cfg.data.dataset in REGRESSION
               else f"{cfg.data.dataset} {cfg.data.ways}-way {cfg.data.shots}-shot")
    inner = "" if cfg.outer.algorithm == "protonet" else f", {plural(cfg.inner.steps, 'inner step')} (lr {cfg.inner.lr:g})"
    return (f"{cfg.outer.algorithm}, {episode}{inner}, meta-batch {cfg.outer.meta_batch_size}, "
            f"{cfg.outer.iterations} outer steps, seed {cfg.seed}")


def run_record(git: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """run.json: the code (metalearn's version and source commit, the working folder's repository and commit),
    the command, torch's version and the start time."""
    return {"git": git, **provenance(), "argv": sys.argv, "torch": torch.__version__,
            "started": datetime.now().isoformat(), **extra}


def build_algorithm(cfg: Config, model: torch.nn.Module):
    """The algorithm named by outer.algorithm (see metalearn/algorithms/), on `model`."""
    from .algorithms import registry

    loss = "mse" if cfg.data.dataset == "sinusoid" else "cross_entropy"
    return registry.build(cfg, model, loss=loss)


def check_data(cfg: Config) -> "tuple[Any, Dict[str, torch.Tensor]]":
    """Open the data set (cheap: nothing decoded yet) and check every episode shape the run will draw.
    Sinusoid regression has no data set: (None, {})."""
    if cfg.data.dataset in REGRESSION:
        return None, {}
    ds, splits = open_dataset(cfg.data)
    ev = eval_settings(cfg)
    check_episode_fits("train", len(splits["train"]), ds.samples_per_class, cfg.data.ways, cfg.data.shots, cfg.data.query_shots)
    if cfg.eval.val_every:
        check_episode_fits("val", len(splits["val"]), ds.samples_per_class, ev["ways"], ev["shots"], ev["query_shots"])
    check_episode_fits(cfg.eval.split, len(splits[cfg.eval.split]), ds.samples_per_class, ev["ways"], ev["shots"], ev["query_shots"])
    if ev["ways"] != cfg.data.ways and cfg.outer.algorithm != "protonet":
        raise MetalearnError(f"eval.ways={ev['ways']} differs from data.ways={cfg.data.ways}, but MAML's head has one output per training way")
    return ds, splits


SINUSOID_EVAL_SEED_OFFSET = {"test": 0, "val": 1, "train": 2}
"""Sinusoid tasks have no class splits: the fixed episodes of split s use seed eval.seed + offset[s]."""


def run_evaluation(cfg: Config, algorithm: Any, split: str, episodes: int, *, images: Optional[torch.Tensor],
                   device: torch.device, progress: bool = False) -> EvalResult:
    """Score `algorithm` on `episodes` fixed episodes of `split` with the run's eval settings.

    images: uint8 (classes, per_class, C, H, W) of the split on `device`; None for sinusoid regression.
    Under torchrun the episodes are sharded across processes and gathered (metalearn/evaluation.py).
    """
    ev = eval_settings(cfg)
    dtype = getattr(torch, cfg.dtype)
    common = dict(ways=ev["ways"], shots=ev["shots"], query_shots=ev["query_shots"], episodes=episodes,
                  inner_steps=ev["inner_steps"], inner_lr=ev["inner_lr"], batch_size=cfg.eval.batch_size,
                  split=split, dtype=dtype, progress=progress, transductive=cfg.eval.transductive)
    if cfg.data.dataset in REGRESSION:
        return evaluate(algorithm, None, seed=cfg.eval.seed + SINUSOID_EVAL_SEED_OFFSET[split], batchnorm="none",
                        sinusoid=cfg.data.split, device=device, **common)
    return evaluate(algorithm, images, seed=cfg.eval.seed, batchnorm=cfg.model.batchnorm, **common)


def eval_runtime(cfg: Config, algorithm: Any) -> Dict[str, Any]:
    """Torch's thread count and the execution path of an evaluation, saved with its result: the same
    checkpoint and episodes give bit-identical accuracies only with the same threads, path and device."""
    plan = algorithm.execution_plan()[0] if hasattr(algorithm, "execution_plan") and cfg.eval.transductive else "loop"
    return {"threads": torch.get_num_threads(), "execution": plan}


def build_sampler(cfg: Config, images: Optional[torch.Tensor], device: torch.device) -> Any:
    """The training episode sampler, seeded by cfg.seed: sinusoid tasks, or episodes of the training
    classes `images` (uint8 (classes, per_class, C, H, W) on `device`). Both have sample(T, part=)."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.data.dataset in REGRESSION:
        return SinusoidSampler(cfg.data.shots, cfg.data.query_shots, protocol=cfg.data.split, seed=cfg.seed,
                               device=device, dtype=dtype)
    return EpisodeSampler(images, cfg.data.ways, cfg.data.shots, cfg.data.query_shots, seed=cfg.seed, split="train",
                          dtype=dtype, rotate=cfg.data.rotation == "per_task")


def model_shape(cfg: Config, ds: Any) -> "tuple[int, int]":
    """(input channels, outputs) of the model: (1, 1) for sinusoid regression, else (channels, ways)."""
    return (1, 1) if cfg.data.dataset in REGRESSION else (ds.channels, cfg.data.ways)


def sharded_meta_step(algorithm: Any, sampler: Any, meta_batch_size: int, reduced: List[torch.Tensor],
                      flags: List[float] = (), dist: Optional[distributed.Context] = None
                      ) -> "tuple[Dict[str, float], List[float]]":
    """Draw the global meta-batch, adapt this process's slice of it, and leave in `.grad` of `reduced`
    the gradient of the global mean query loss. Returns (metrics of the global meta-batch, flags summed
    over processes). One process: exactly `algorithm.meta_step(sampler.sample(T))`."""
    dist = dist or distributed.context()
    if not dist.enabled:
        return algorithm.meta_step(sampler.sample(meta_batch_size)), list(flags)
    lo, hi = distributed.shard(meta_batch_size, dist)
    metrics = algorithm.meta_step(sampler.sample(meta_batch_size, part=slice(lo, hi)))
    weight = (hi - lo) / meta_batch_size
    distributed.all_reduce_gradients(reduced, weight, dist)
    distributed.average_buffers(algorithm.model, dist)
    return distributed.reduce_metrics(metrics, weight, flags, dist)


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


_STALE_TMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""Temp files of `_io.atomic_write` (mkstemp: '.<name>.<8 chars>.tmp'); a kill before the rename leaves one."""


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


def _nonfinite_after_update(params: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> Optional[str]:
    """What is NaN/inf after an outer update (a parameter, or the optimiser's state), or None."""
    tensors = [*params.values(), *(t for st in optimizer.state.values() for t in st.values()
                                   if isinstance(t, torch.Tensor) and t.is_floating_point())]
    if bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        return None
    return ("parameter " + bad) if (bad := nonfinite_tensor(params)) else "optimiser state"


def guarded_step(optimizer: torch.optim.Optimizer, params: Dict[str, torch.Tensor], *, where: str, hint: str,
                 kept: Any) -> None:
    """optimizer.step(), refusing a non-finite outcome (train and pre-training): an overflow inside the step
    (e.g. Adam's "value cannot be converted to type float without overflow") or a NaN/inf parameter or
    optimiser state afterwards stops with one line naming `where`; nothing of it is ever saved.
    kept() says which checkpoint survives."""
    try:
        optimizer.step()
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise MetalearnError(f"the {where} overflows ({' '.join(str(e).split())}); {kept()}. {hint}") from None
    bad = _nonfinite_after_update(params, optimizer)
    if bad is not None:  # never saved: the last good checkpoint stays
        raise MetalearnError(f"non-finite {bad} after the {where}; stopped without saving it, {kept()}. {hint}")


class _SignalStop(BaseException):
    """SIGINT/SIGTERM during the final evaluation (see `_RaiseOnSignals`)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _RaiseOnSignals(_StopSignals):
    """SIGINT/SIGTERM raise `_SignalStop` at once (the final evaluation: there is no step to finish)."""

    def _handle(self, signum: int, frame: Any) -> None:
        raise _SignalStop(signal.Signals(signum).name)


def _finished_result(out: Path, ckpt: Optional[Dict[str, Any]], cfg: Config,
                     total: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The saved evaluation summary of a run that already trained all its steps and was evaluated, else None.
    total: the run's number of steps (default outer.iterations; pre-training passes transfer.pretrain.steps)."""
    path = out / f"eval-{cfg.eval.split}.json"
    total = cfg.outer.iterations if total is None else total
    if ckpt is None or ckpt["step"] < total or not path.is_file():
        return None
    import json

    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # torn or unreadable: evaluate again
    if not isinstance(saved, dict) or not isinstance(saved.get("eval"), dict):
        return None
    return {**saved, "run_dir": str(out), "interrupted": None, "step": ckpt["step"], "finished": True}


def train(cfg: Config, *, resume: bool = False) -> Dict[str, Any]:
    """Meta-train `cfg`, checkpointing as it goes, then evaluate on the fixed episodes of `eval.split`.

    resume: continue from `tracking.out_dir/tracking.name/checkpoint.pt` (bit-identical on CPU to a run
    that was never interrupted). Returns a summary dict; `summary["interrupted"]` names the signal
    (SIGINT/SIGTERM) when the run stopped early after saving a checkpoint.

    Under torchrun (after `distributed.init`), every process calls this with the same cfg; rank 0
    alone writes files, prints and logs, and all return the same summary.
    """
    cfg = copy.deepcopy(cfg)
    dist = distributed.context()
    main = dist.is_main
    distributed.check_algorithm(cfg.outer.algorithm, dist)
    distributed.check_meta_batch(cfg.outer.meta_batch_size, dist)
    if not cfg.tracking.name:
        if resume:
            raise MetalearnError("--resume needs the run's name: pass the run's config.yaml or tracking.name=...")
        what = "" if cfg.data.dataset in REGRESSION else f"{cfg.data.ways}w"
        stamp = distributed.broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S"), dist)  # one name for all ranks
        cfg.tracking.name = f"{cfg.data.dataset}-{what}{cfg.data.shots}s-{stamp}"

    # --- seeding and device -------------------------------------------------------------
    device, dtype = seed_and_device(cfg)
    set_precision(cfg.precision, device)  # before anything is written: tf32 without CUDA is refused here

    # --- data: open (cheap), check every episode shape against the splits, then decode ----
    ds, splits = check_data(cfg)
    out, ckpt = distributed.on_main(lambda: open_run_dir(cfg, resume), dist)  # checks only; rank 0's verdict
    finished = distributed.on_main(lambda: _finished_result(out, ckpt, cfg), dist)
    if finished is not None:  # resuming a finished run: nothing to train, evaluate or log again
        return finished
    # rank 0 decodes (and caches) the images first, the other processes then read its cache
    images = None if ds is None else distributed.main_first(lambda: ds.images, dist).to(device)
    split_images = (lambda split: None) if images is None else (lambda split: images[splits[split].to(device)])
    sampler = build_sampler(cfg, split_images("train"), device)

    # --- model, algorithm, optimiser ----------------------------------------------------
    in_channels, outputs = model_shape(cfg, ds)
    model = build_model(cfg.model, in_channels, outputs, cfg.data.image_size).to(device=device, dtype=dtype)
    algorithm = build_algorithm(cfg, model)
    trained = select([n for n, _ in model.named_parameters()], cfg.outer.train, what="outer.train")
    named = dict(model.named_parameters())
    optimizer = algorithm.outer_optimizer([named[n] for n in trained], cfg.outer.lr)  # Adam (+ learned lrs); SGD for reptile
    learnables = algorithm.meta_parameters() if hasattr(algorithm, "meta_parameters") else []
    checked = {**{n: named[n] for n in trained}, **{f"{cfg.outer.algorithm} learnable {i}": p for i, p in enumerate(learnables)}}
    reduced = list(checked.values())  # what the processes all-reduce: trained parameters and learnables
    # --- run folder: a fresh one, or the checkpoint's state restored exactly ----------------
    git = git_info() if main else {}
    start, wandb_id = 0, None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("algorithm") and hasattr(algorithm, "load_state_dict"):
                algorithm.load_state_dict(ckpt["algorithm"])
            sampler.load_state_dict(ckpt["sampler"])  # the global sampler state: valid for any number of processes
            set_rng_state(ckpt["rng"])
            start, wandb_id = ckpt["step"], (ckpt.get("tracking") or {}).get("wandb_id")
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise MetalearnError(f"--resume: {out / CHECKPOINT_NAME} does not fit this run ({type(e).__name__}: {why})") from None
        bad = nonfinite_tensor(ckpt["model"])
        if bad is not None:
            raise MetalearnError(f"--resume: {out / CHECKPOINT_NAME} holds a non-finite parameter ({bad})")
    else:
        created = out  # the topmost folder this run creates (removed again if W&B cannot start)
        while not created.parent.exists() and created.parent != created:
            created = created.parent
        fresh_folder = not out.exists()

        def create() -> None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg))), mode="w")
            atomic_json(run_record(git, world_size=dist.world_size), out / "run.json")
        distributed.on_main(create, dist)
    # the same starting point on every process (identical by seeding already; this makes it certain)
    distributed.broadcast_parameters([*model.parameters(), *learnables, *model.buffers()], dist)

    def run_eval(split: str, episodes: int, progress: bool) -> EvalResult:
        return run_evaluation(cfg, algorithm, split, episodes, images=split_images(split), device=device,
                              progress=progress)

    # --- trackers: metrics.jsonl always, W&B when enabled (rank 0 only) ---------------------
    def open_trackers() -> Trackers:
        trackers: List[Any] = [JsonlTracker(out / "metrics.jsonl", keep_until=start if resume else None)]
        if cfg.tracking.tensorboard:  # local and cheap: before W&B, so that a missing package starts nothing
            trackers.append(TensorboardTracker(out / "tensorboard", config=to_dict(cfg),
                                               purge_step=start + 1 if resume and start else None))
        wandb_run = None
        if cfg.tracking.wandb.enabled:
            wandb_run = WandbTracker(cfg.tracking.wandb, run_dir=out, name=cfg.tracking.name, config=to_dict(cfg),
                                     run_id=wandb_id)
            trackers.append(wandb_run)
        return Trackers(trackers, wandb_run)

    def open_trackers_or_clean_up() -> Trackers:
        try:
            return open_trackers()
        except BaseException:
            if ckpt is None and not resume:  # e.g. W&B could not start: leave no folder that blocks a re-run
                if fresh_folder:
                    shutil.rmtree(created, ignore_errors=True)
                else:
                    for name in ("config.yaml", "run.json", "metrics.jsonl"):
                        (out / name).unlink(missing_ok=True)
            raise

    tracker = distributed.main_only(open_trackers_or_clean_up, dist) or Trackers([])  # other ranks log nowhere
    wandb_run = tracker.wandb
    if main and hasattr(algorithm, "execution_plan"):
        mode, why = algorithm.execution_plan()
        print(f"execution: {mode} ({why})", file=sys.stderr)
    metric = getattr(algorithm, "metric_name", "accuracy")

    def save(step: int) -> None:
        if not main:
            return
        algo_state = algorithm.state_dict() if hasattr(algorithm, "state_dict") else {}
        save_checkpoint(out / CHECKPOINT_NAME, step=step, config=to_dict(cfg), git=git,
                        model=model.state_dict(), optimizer=optimizer.state_dict(), algorithm=algo_state,
                        sampler=sampler.state_dict(), rng=rng_state(),
                        tracking={"wandb_id": wandb_run.id if wandb_run else None})

    # --- the loop -------------------------------------------------------------------------
    total = cfg.outer.iterations
    if start and main:
        print(f"resuming {out} from step {start} of {total}", file=sys.stderr)
    bar = tqdm(total=total, initial=start, desc="meta-train", disable=not (cfg.tracking.progress and main),
               dynamic_ncols=True)
    window, t_window, t_start = [], time.perf_counter(), time.perf_counter()
    saved_step, step, exit_code = (start if ckpt is not None else None), start, 1
    stopped: Optional[str] = None
    try:
        with _StopSignals() as stop:
            for step in range(start + 1, total + 1):
                model.zero_grad(set_to_none=True)
                optimizer.zero_grad(set_to_none=True)  # also the algorithm's learnables (metasgd alpha, mamlpp lrs)
                algorithm.schedule(step, total, optimizer)  # annealing: reptile's epsilon, MAML++'s schedules
                # with several processes, a signal seen by any of them before this step's all-reduce
                # stops all of them after this same step (a later one counts at the next step)
                flags = [float(stop.received == "SIGINT"), float(stop.received == "SIGTERM")]
                with meta_step_context(cfg.precision, device):  # bf16: autocast; fp32/tf32: nothing
                    metrics, flags = sharded_meta_step(algorithm, sampler, cfg.outer.meta_batch_size, reduced, flags, dist)
                halt = (("SIGINT" if flags[0] else "SIGTERM") if any(flags) else None) if dist.enabled else stop.received
                bad = _nonfinite(metrics, checked)
                if bad is not None:
                    kept = (f"the last good checkpoint (step {saved_step}) is kept in {out / CHECKPOINT_NAME}"
                            if saved_step is not None else "no checkpoint had been written yet")
                    raise MetalearnError(f"non-finite {bad} at step {step}; stopped without applying it, {kept}. "
                                         f"Lower inner.lr or outer.lr")
                guarded_step(optimizer, checked, where=f"outer update of step {step}", hint="Lower outer.lr",
                             kept=lambda: (f"the last good checkpoint (step {saved_step}) is kept in {out / CHECKPOINT_NAME}"
                                           if saved_step is not None else "no checkpoint had been written yet"))
                bar.update(1)
                window.append(metrics)
                if step % cfg.tracking.log_every == 0 or step == total:
                    now = time.perf_counter()
                    row = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                    row["tasks_per_s"] = len(window) * cfg.outer.meta_batch_size / (now - t_window)
                    tracker.log(step, {f"train/{k}": v for k, v in row.items()})
                    bar.set_postfix(loss=f"{row['loss']:.3f}", **{metric[:3]: f"{row.get(metric, float('nan')):.3f}"},
                                    tasks_s=f"{row['tasks_per_s']:.0f}")
                    window, t_window = [], now
                if cfg.eval.val_every and step % cfg.eval.val_every == 0:
                    val = run_eval("val", cfg.eval.val_episodes, progress=False)
                    tracker.log(step, {f"val/{metric}": val.mean, "val/ci95": val.ci95})
                    if main:
                        bar.write(f"step {step}: {val.summary()}")
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == total or halt:
                    save(step)
                    saved_step = step
                if halt:
                    stopped = halt
                    break
        bar.close()
        train_seconds = time.perf_counter() - t_start
        if saved_step != step:  # e.g. resuming a run that had already finished
            save(step)
        if stopped:
            exit_code = 130 if stopped == "SIGINT" else 143
            return {"run_dir": str(out), "interrupted": stopped, "step": step,
                    "train_seconds": round(train_seconds, 2), "eval": None}

        # --- final evaluation, learning curve (titled with the result), artifact -------------------
        try:
            with _RaiseOnSignals():
                result = run_eval(cfg.eval.split, cfg.eval.episodes, progress=cfg.tracking.progress)
                curve = (plot_learning_curve(read_jsonl(out / "metrics.jsonl", tolerant=True), out / "learning_curve.png",
                                             title=curve_title(cfg.tracking.name, run_settings(cfg), result.summary()))
                         if main else None)
        except _SignalStop as e:  # the checkpoint of the last step is saved: --resume evaluates it
            exit_code = 130 if e.name == "SIGINT" else 143
            return {"run_dir": str(out), "interrupted": e.name, "step": step, "during": "the final evaluation",
                    "train_seconds": round(train_seconds, 2), "eval": None}
        final = {f"{cfg.eval.split}/{metric}": result.mean, f"{cfg.eval.split}/ci95": result.ci95}
        tracker.log(total, final)
        tracker.summary({**final, f"{cfg.eval.split}/episodes": result.episodes})
        summary = {"run_dir": str(out), "interrupted": None, "step": total, "train_seconds": round(train_seconds, 2),
                   "eval": {**result.to_dict(), **eval_runtime(cfg, algorithm)}}
        if main:
            atomic_json(summary, out / f"eval-{cfg.eval.split}.json")
        if main:
            tracker.log_image("learning_curve", curve, step=total)
            tracker.log_text(f"eval/{cfg.eval.split}", result.summary(), step=total)
        if wandb_run is not None:
            if cfg.tracking.wandb.log_checkpoint:
                wandb_run.log_checkpoint(out / CHECKPOINT_NAME, name=f"checkpoint-{wandb_run.id}",
                                         metadata={"step": total, **final})
        exit_code = 0
        return summary
    finally:
        bar.close()
        if wandb_run is not None:
            wandb_run.exit_code = exit_code  # a W&B segment stopped by a signal records 130/143, not 0
        tracker.close(exit_code == 0)
