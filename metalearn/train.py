"""The training loop, top to bottom: seeding, data, model, algorithm, optimiser, loop, eval, log, checkpoint.

`train(cfg)` meta-trains: each step of the loop draws a meta-batch of tasks from the benchmark
(metalearn/data/benchmark.py: N-way K-shot image classification, or sinusoid regression), lets the
algorithm adapt to each task and accumulate the meta-gradient (`MetaStep`), and applies the outer
update. Supervised pre-training (metalearn/transfer/pretrain.py) runs through the same `loop` with
a mini-batch step of its own: a `Step` is all that differs.

Around the loop: the run folder, its trackers and checkpoints are metalearn/runfolder.py's; what
stops a run (signals, non-finite values) is metalearn/guards.py's; the fixed-episode evaluation is
metalearn/evaluation.py's. Under torchrun every process runs this loop on its slice of each
meta-batch (metalearn/distributed.py); rank 0 alone writes.
"""
from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from ._io import atomic_json
from .algorithms import registry
from .config import Config, eval_settings
from .data.benchmark import Benchmark, benchmark_kind, open_benchmark
from .errors import MetalearnError
from .evaluation import EvalResult, eval_runtime, plural, run_evaluation
from .guards import RaiseOnSignals, SignalStop, StopSignals, exit_code, guarded_step, nonfinite_step
from .inner import select
from .models import build_model
from .precision import meta_step_context, set_precision
from .runfolder import RunFolder, _flatten  # noqa: F401  (_flatten: metalearn.ablate compares saved configs)
from .tracking import curve_title, plot_learning_curve, read_jsonl


# --- seeding and device ------------------------------------------------------------------------

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


# --- data, algorithm ---------------------------------------------------------------------------

def check_data(cfg: Config) -> Benchmark:
    """Open the run's benchmark (cheap: nothing decoded yet) and check every episode shape the run will draw."""
    benchmark = open_benchmark(cfg)
    ev = eval_settings(cfg)
    d = cfg.data
    benchmark.check_episodes("train", d.ways, d.shots, d.query_shots)
    if cfg.eval.val_every:
        benchmark.check_episodes("val", ev["ways"], ev["shots"], ev["query_shots"])
    benchmark.check_episodes(cfg.eval.split, ev["ways"], ev["shots"], ev["query_shots"])
    if ev["ways"] != d.ways and not registry.capabilities(cfg.outer.algorithm).test_ways_may_differ:
        raise MetalearnError(f"eval.ways={ev['ways']} differs from data.ways={d.ways}, but {cfg.outer.algorithm}'s "
                             f"head has one output per training way")
    return benchmark


def build_algorithm(cfg: Config, model: torch.nn.Module):
    """The algorithm named by outer.algorithm (see metalearn/algorithms/), on `model`."""
    from .algorithms import registry
    from .engine import Engine

    loss = benchmark_kind(cfg).loss  # "cross_entropy" (N-way classification) or "mse" (regression)
    return Engine(registry.build(cfg, model, loss=loss), cfg.outer.execution, cfg.outer.task_chunk,
                  compile=cfg.outer.compile)


def run_settings(cfg: Config, benchmark: Benchmark) -> str:
    """The key settings of a run, for the learning curve's title: "maml, omniglot 5-way 1-shot, 1 inner step
    (lr 0.4), meta-batch 32, 60000 outer steps, seed 0"."""
    inner = (f", {plural(cfg.inner.steps, 'inner step')} (lr {cfg.inner.lr:g})"
             if registry.capabilities(cfg.outer.algorithm).inner_loop else "")
    return (f"{cfg.outer.algorithm}, {benchmark.description}{inner}, meta-batch {cfg.outer.meta_batch_size}, "
            f"{cfg.outer.iterations} outer steps, seed {cfg.seed}")


# --- a step of the loop ------------------------------------------------------------------------

class Step(Protocol):
    """One step of the loop: draw a batch, compute the loss and gradients, update; and what the loop
    checkpoints. Meta-training's step is `MetaStep`; pre-training's is transfer.pretrain.SupervisedStep."""

    name: str
    """The progress bar's label: "meta-train", "pre-train"."""
    total: int
    """Steps of the run (outer.iterations, transfer.pretrain.steps)."""
    metric: str
    """The metric the step's metrics hold besides "loss": "accuracy" or "mse"."""
    rate: Tuple[str, str, int]
    """Throughput: (logged key, progress-bar key, examples per step), e.g. ("tasks_per_s", "tasks_s", 32)."""
    note: str
    """A line printed to stderr before the first step ("" for none)."""

    def __call__(self, step: int, stop: StopSignals) -> Tuple[Dict[str, float], Optional[str]]:
        """Run step `step` (1-based): (its metrics, the signal that stops the run after it or None).
        Raises MetalearnError, before anything is applied or saved, on a non-finite value."""

    def counters(self) -> Dict[str, Any]:
        """Logged beside the metrics, e.g. pre-training's epoch."""

    def state_dict(self) -> Dict[str, Any]:
        """What the checkpoint holds besides step, config, git, RNGs and tracking (model, optimizer, ...)."""

    def load_state_dict(self, checkpoint: Dict[str, Any]) -> None:
        """Restore state_dict()'s parts from a checkpoint dict."""


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


class MetaStep:
    """One outer step of meta-training: schedule, the (sharded) meta-step on a meta-batch from `sampler`,
    the outer update of `checked` (the trained parameters and the algorithm's learnables).

    Under torchrun a signal seen by any process before this step's all-reduce stops all of them after
    this same step (a later one counts at the next step)."""

    name = "meta-train"

    def __init__(self, cfg: Config, algorithm: Any, sampler: Any, optimizer: torch.optim.Optimizer,
                 checked: Dict[str, torch.Tensor], *, device: torch.device, kept: Callable[[], str],
                 dist: distributed.Context):
        self.cfg, self.algorithm, self.sampler, self.optimizer = cfg, algorithm, sampler, optimizer
        self.checked = checked
        self.device, self.kept, self.dist = device, kept, dist
        self.total, self.metric = cfg.outer.iterations, algorithm.metric_name
        self.rate = ("tasks_per_s", "tasks_s", cfg.outer.meta_batch_size)
        mode, why = algorithm.execution_plan()
        self.note = f"execution: {mode} ({why})"

    def __call__(self, step: int, stop: StopSignals) -> Tuple[Dict[str, float], Optional[str]]:
        algorithm, optimizer = self.algorithm, self.optimizer
        algorithm.model.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)  # also the algorithm's learnables (metasgd alpha, mamlpp lrs)
        algorithm.schedule(step, self.total, optimizer)  # annealing: reptile's epsilon, MAML++'s schedules
        flags = [float(stop.received == "SIGINT"), float(stop.received == "SIGTERM")]
        with meta_step_context(self.cfg.precision, self.device):  # bf16: autocast; fp32/tf32: nothing
            metrics, flags = sharded_meta_step(algorithm, self.sampler, self.cfg.outer.meta_batch_size,
                                               list(self.checked.values()), flags, self.dist)
        halt = (("SIGINT" if flags[0] else "SIGTERM") if any(flags) else None) if self.dist.enabled else stop.received
        bad = nonfinite_step(metrics, self.checked)
        if bad is not None:
            raise MetalearnError(f"non-finite {bad} at step {step}; stopped without applying it, {self.kept()}. "
                                 f"Lower inner.lr or outer.lr")
        guarded_step(optimizer, self.checked, where=f"outer update of step {step}", hint="Lower outer.lr",
                     kept=self.kept)
        return metrics, halt

    def counters(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.algorithm.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "algorithm": self.algorithm.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, checkpoint: Dict[str, Any]) -> None:
        self.algorithm.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("algorithm"):  # learned inner lrs (metasgd, mamlpp), reptile's Adam state
            self.algorithm.load_state_dict(checkpoint["algorithm"])
        self.sampler.load_state_dict(checkpoint["sampler"])  # the global state: valid for any number of processes


@dataclass
class Scored:
    """An evaluation as the loop logs, saves and prints it."""

    result: EvalResult
    record: Dict[str, Any]
    """eval-<split>.json's "eval": the result and what the evaluation adds (threads and path; support accuracy)."""
    line: str
    """The result in one line: validation progress, the learning curve's title, the trackers' text."""
    extra: Dict[str, float] = field(default_factory=dict)
    """Logged beside the mean and CI, e.g. {"support_accuracy": 0.98}."""

    def metrics(self, split: str) -> Dict[str, float]:
        r = self.result
        return {f"{split}/{r.metric}": r.mean, f"{split}/ci95": r.ci95,
                **{f"{split}/{k}": v for k, v in self.extra.items()}}


Evaluate = Callable[[str, int, bool], Scored]
"""(split, episodes, progress) -> the run's model scored on that many fixed episodes of the split."""


# --- the loop ----------------------------------------------------------------------------------

def loop(cfg: Config, run: RunFolder, step: Step, evaluate: Evaluate, *, settings: str,
         final_eval: bool = True) -> Dict[str, Any]:
    """Train `step` for step.total steps in `run`, validating every eval.val_every steps, logging every
    tracking.log_every, checkpointing every checkpoint.every and at the end; then (final_eval) evaluate on
    eval.split and draw the learning curve, titled with the run's name, `settings` and the result.

    Starts from run.checkpoint when there is one (bit-identical on CPU to a run that was never
    interrupted), else creates the run folder. SIGINT/SIGTERM finish the step, checkpoint and return
    {"interrupted": signal name}; during the final evaluation they return at once ("during"). Returns
    {"run_dir", "interrupted", "step", "train_seconds", "eval"}: eval is the final record or None.
    """
    main, total = run.dist.is_main, step.total
    start = run.restore(step) if run.checkpoint is not None else run.create()
    tracker = run.open_trackers(start)
    if main and step.note:
        print(step.note, file=sys.stderr)
    if start and main:
        print(f"resuming {run.path} from step {start} of {total}", file=sys.stderr)
    rate_key, rate_label, per_step = step.rate
    bar = tqdm(total=total, initial=start, desc=step.name, disable=not (cfg.tracking.progress and main),
               dynamic_ncols=True)
    window, t_window, t_start = [], time.perf_counter(), time.perf_counter()
    i, code, stopped = start, 1, None
    summary: Dict[str, Any] = {"run_dir": str(run.path), "interrupted": None, "step": start, "train_seconds": None,
                               "eval": None}
    try:
        with StopSignals() as stop:
            for i in range(start + 1, total + 1):
                metrics, halt = step(i, stop)
                bar.update(1)
                window.append(metrics)
                if i % cfg.tracking.log_every == 0 or i == total:
                    now = time.perf_counter()
                    row = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                    row[rate_key] = len(window) * per_step / (now - t_window)
                    row.update(step.counters())
                    tracker.log(i, {f"train/{k}": v for k, v in row.items()})
                    score = row.get(step.metric, float("nan"))
                    bar.set_postfix(loss=f"{row['loss']:.3f}", **{step.metric[:3]: f"{score:.3f}",
                                                                   rate_label: f"{row[rate_key]:.0f}"})
                    window, t_window = [], now
                if cfg.eval.val_every and i % cfg.eval.val_every == 0:
                    val = evaluate("val", cfg.eval.val_episodes, False)
                    tracker.log(i, val.metrics("val"))
                    if main:
                        bar.write(f"step {i}: {val.line}")
                if (cfg.checkpoint.every and i % cfg.checkpoint.every == 0) or i == total or halt:
                    run.save(i, step.state_dict())
                if halt:
                    stopped = halt
                    break
        bar.close()
        summary.update(step=i, train_seconds=round(time.perf_counter() - t_start, 2))
        if run.saved_step != i:  # e.g. resuming a run that had already finished
            run.save(i, step.state_dict())
        if stopped:
            code = exit_code(stopped)
            return {**summary, "interrupted": stopped}

        # --- final evaluation, learning curve (titled with the result), artifact ----------------
        try:
            with RaiseOnSignals():
                result = evaluate(cfg.eval.split, cfg.eval.episodes, cfg.tracking.progress) if final_eval else None
                title = curve_title(cfg.tracking.name, settings, result.line if result else "")
                curve = (plot_learning_curve(read_jsonl(run.path / "metrics.jsonl", tolerant=True),
                                             run.path / "learning_curve.png", title=title) if main else None)
        except SignalStop as e:  # the checkpoint of the last step is saved: --resume evaluates it
            code = exit_code(e.name)
            return {**summary, "interrupted": e.name, "during": "the final evaluation"}
        final: Dict[str, float] = {}
        if result is not None:
            final = result.metrics(cfg.eval.split)
            tracker.log(total, final)
            tracker.summary({**final, f"{cfg.eval.split}/episodes": result.result.episodes})
            summary["eval"] = result.record
            if main:
                atomic_json(summary, run.path / f"eval-{cfg.eval.split}.json")
        if main:
            tracker.log_image("learning_curve", curve, step=total)
            if result is not None:
                tracker.log_text(f"eval/{cfg.eval.split}", result.line, step=total)
        if run.wandb is not None and cfg.tracking.wandb.log_checkpoint:
            run.wandb.log_checkpoint(run.checkpoint_path, name=f"checkpoint-{run.wandb.id}",
                                     metadata={"step": total, **final})
        code = 0
        return summary
    finally:
        bar.close()
        if run.wandb is not None:
            run.wandb.exit_code = code  # a W&B segment stopped by a signal records 130/143, not 0
        tracker.close(code == 0)


# --- meta-training -----------------------------------------------------------------------------

def train(cfg: Config, *, resume: bool = False) -> Dict[str, Any]:
    """Meta-train `cfg`, checkpointing as it goes, then evaluate on the fixed episodes of `eval.split`.

    resume: continue from `tracking.out_dir/tracking.name/checkpoint.pt` (bit-identical on CPU to a run
    that was never interrupted). Returns `loop`'s summary; resuming a run that finished and was evaluated
    returns its saved result ("finished": True) without training, evaluating or logging again.

    Under torchrun (after `distributed.init`), every process calls this with the same cfg; rank 0
    alone writes files, prints and logs, and all return the same summary.
    """
    cfg = copy.deepcopy(cfg)
    dist = distributed.context()
    name = cfg.outer.algorithm
    if not registry.capabilities(name).meta_trained:
        raise MetalearnError(f"outer.algorithm={name} is an evaluation-time adapter, not meta-trained: "
                             f"`metalearn train` and `metalearn pretrain` run it as a transfer baseline")
    distributed.check_algorithm(name, dist)
    distributed.check_meta_batch(cfg.outer.meta_batch_size, dist)
    if not cfg.tracking.name and resume:
        raise MetalearnError("--resume needs the run's name: pass the run's config.yaml or tracking.name=...")

    # --- seeding and device ---------------------------------------------------------------------
    device, dtype = seed_and_device(cfg)
    set_precision(cfg.precision, device)  # before anything is written: tf32 without CUDA is refused here

    # --- data: open (cheap), check every episode shape, then the run folder, then decode ----------
    benchmark = check_data(cfg)
    if not cfg.tracking.name:
        stamp = distributed.broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S"), dist)  # one name for all ranks
        cfg.tracking.name = f"{benchmark.tag}-{stamp}"
    run = RunFolder.open(cfg, resume, dist=dist, world_size=dist.world_size)  # checks only; rank 0's verdict
    finished = run.finished(cfg.outer.iterations)
    if finished is not None:  # resuming a finished run: nothing to train, evaluate or log again
        return finished
    distributed.main_first(lambda: benchmark.load(device), dist)  # rank 0 decodes (and caches) first
    sampler = benchmark.sampler(cfg.seed, dtype)

    # --- model, algorithm, optimiser ------------------------------------------------------------
    model = build_model(cfg.model, benchmark.channels, benchmark.outputs, cfg.data.image_size)
    model = model.to(device=device, dtype=dtype)
    algorithm = build_algorithm(cfg, model)
    trained = select([n for n, _ in model.named_parameters()], cfg.outer.train, what="outer.train")
    named = dict(model.named_parameters())
    optimizer = algorithm.outer_optimizer([named[n] for n in trained], cfg.outer.lr)  # Adam (+ learnables); reptile SGD
    learnables = algorithm.meta_parameters()
    checked = {**{n: named[n] for n in trained}, **{f"{name} learnable {i}": p for i, p in enumerate(learnables)}}
    # the same starting point on every process (identical by seeding already; this makes it certain)
    distributed.broadcast_parameters([*model.parameters(), *learnables, *model.buffers()], dist)

    def evaluate(split: str, episodes: int, progress: bool) -> Scored:
        result = run_evaluation(cfg, algorithm, split, episodes, benchmark=benchmark, progress=progress)
        return Scored(result, {**result.to_dict(), **eval_runtime(cfg, algorithm)}, result.summary())

    # --- the loop, eval, log, checkpoint ---------------------------------------------------------
    step = MetaStep(cfg, algorithm, sampler, optimizer, checked, device=device, kept=run.kept, dist=dist)
    return loop(cfg, run, step, evaluate, settings=run_settings(cfg, benchmark))


__all__ = ["MetaStep", "Scored", "Step", "build_algorithm", "check_data", "eval_runtime", "eval_settings", "loop",
           "resolve_device", "run_evaluation", "run_settings", "seed_and_device", "seed_everything",
           "sharded_meta_step", "train"]
