"""Evaluation on a fixed, enumerated, seeded list of episodes.

Each episode: adapt on its support set (test-time inner steps and lr, set independently of
training), score its query set: accuracy for classification, mean squared error for sinusoid
regression (`EvalResult.metric`). Report the mean over episodes with a 95% confidence interval,
1.96 * s / sqrt(n), s the sample standard deviation (ddof=1).

Under torchrun (metalearn/distributed.py) the episodes are sharded across processes in whole
batches of `batch_size` (each batch is the same as in a one-process run) and gathered in order,
so every process reports the numbers a single process would.

`run_evaluation(cfg, algorithm, split, episodes, benchmark=)` is a run's evaluation: the config's
eval settings on the fixed episodes of its benchmark (metalearn/data/benchmark.py), as the training
loop, `metalearn eval` and validation use it.

BatchNorm: conv4's BatchNorm is transductive (batch statistics of the query set at scoring
time, as in MAML's code); the mode is recorded in the result.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .config import eval_settings
from .data import fixed_episodes
from .data.benchmark import Benchmark


@dataclass
class EvalResult:
    split: str
    episodes: int
    ways: int
    shots: int
    query_shots: int
    inner_steps: int
    inner_lr: Optional[float]
    """The scalar test-time lr; None for algorithms that adapt with their learned lrs (Meta-SGD, MAML++)."""
    seed: int
    batchnorm: str
    mean: float
    ci95: float
    accuracies: List[float] = field(repr=False)
    """Every episode's score, in episode order: accuracies, or MSEs when metric == "mse"."""
    transductive: bool = True
    """True: each query set scored as one batch (BatchNorm uses its statistics); False: each query
    example scored in a batch with the support set only."""
    metric: str = "accuracy"
    """What mean, ci95 and the per-episode values measure: "accuracy" (classification) or "mse" (regression).
    Results saved before this field existed are accuracies."""
    inner_loop: bool = True
    """False for algorithms that adapt without inner steps (ProtoNet): inner_steps and inner_lr do not apply."""

    def summary(self) -> str:
        """The result line of `metalearn train` and `metalearn eval` (and of validation during training), e.g.
        "test accuracy: 93.16 ± 0.52% (95% CI) over 600 5-way 1-shot episodes, 1 inner step"."""
        what = "MSE" if self.metric == "mse" else "accuracy"
        score = format_score(self.metric, self.mean, self.ci95, named=False)
        return f"{self.split} {what}: {score} (95% CI) over {self.protocol()}"

    def protocol(self) -> str:
        """"600 5-way 1-shot episodes, 5 inner steps"; "100 5-shot sinusoid episodes, 1 inner step"."""
        kind = f"{self.shots}-shot sinusoid" if self.metric == "mse" else f"{self.ways}-way {self.shots}-shot"
        steps = f", {plural(self.inner_steps, 'inner step')}" if self.inner_loop else ""
        return f"{self.episodes} {kind} episodes{steps}"

    def file_name(self, prefix: str = "eval") -> str:
        """A file name that names every setting that changes the numbers, so that evaluations of one checkpoint
        with different settings never overwrite each other: split, ways, shots, query shots, inner steps and
        lr (not for ProtoNet; no lr when the lrs are learned), transductive or not, the episode seed and the
        number of episodes, e.g. eval-test-5w1s15q-5steps-lr0.4-transductive-seed0-600ep.json."""
        shape = (f"{self.shots}s" if self.metric == "mse" else f"{self.ways}w{self.shots}s") + f"{self.query_shots}q"
        parts = [prefix, self.split, shape]
        if self.inner_loop:
            parts.append(f"{self.inner_steps}step{'' if self.inner_steps == 1 else 's'}")
            parts.append("lr-learned" if self.inner_lr is None else f"lr{float(self.inner_lr)!r}")
        if self.metric != "mse":
            parts.append("transductive" if self.transductive else "inductive")
        parts += [f"seed{self.seed}", f"{self.episodes}ep"]
        return "-".join(parts) + ".json"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        """Inverse of to_dict; also reads results saved before `metric` existed (accuracy)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def format_score(metric: str, mean: float, ci95: float, named: bool = True) -> str:
    """"93.16 ± 0.52%" for accuracy, "MSE 0.5123 ± 0.0456" for regression (both 95% CI; "0.5123 ± 0.0456"
    with named=False)."""
    if metric == "mse":
        return f"{'MSE ' if named else ''}{mean:.4f} ± {ci95:.4f}"
    return f"{100 * mean:.2f} ± {100 * ci95:.2f}%"


def plural(n: int, what: str) -> str:
    """"1 inner step", "5 inner steps"."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)) with the sample standard deviation; ci is 0 for one value."""
    v = values.double()
    n = v.numel()
    if n == 0:
        raise ValueError("no values")
    std = v.std(unbiased=True).item() if n > 1 else 0.0
    return v.mean().item(), 1.96 * std / math.sqrt(n)


def evaluate(algorithm, images: Optional[torch.Tensor], *, ways: int, shots: int, query_shots: int, episodes: int,
             seed: int, inner_steps: int, inner_lr: float, batch_size: int = 50, split: str = "test",
             batchnorm: str = "transductive", dtype: torch.dtype = torch.float32,
             progress: bool = False, transductive: bool = True, benchmark: Optional[Benchmark] = None,
             dist=None) -> EvalResult:
    """Score `algorithm` on the fixed episodes 0..episodes-1 fixed by `seed`.

    images: uint8 (classes, per_class, C, H, W) of the split, on the evaluation device; or None with
    `benchmark`, a loaded Benchmark whose fixed episodes of `split` are scored (image classes or
    generated tasks, on its device). dist: a metalearn.distributed.Context; with several processes each
    scores its shard of whole batches and the per-episode values are gathered (identical on every process).
    """
    from . import distributed

    dist = dist or distributed.context()
    lo, hi = distributed.shard_batches(episodes, batch_size, dist)
    if benchmark is not None:
        batches = benchmark.episodes(split, ways=ways, shots=shots, query_shots=query_shots, count=hi, seed=seed,
                                     batch_size=batch_size, dtype=dtype, start=lo)
    else:
        batches = fixed_episodes(images, ways, shots, query_shots, count=hi, seed=seed,
                                 batch_size=batch_size, split=split, dtype=dtype, start=lo)
    values = []
    with tqdm(total=hi - lo, desc=f"eval {split}", disable=not (progress and dist.is_main), leave=False,
              dynamic_ncols=True) as bar:
        # the per-task loops of the algorithms report each scored episode (algorithms/base.py episode_done);
        # a batched path scores a whole batch at once, and the bar then moves by the batch
        algorithm.on_episode = (lambda: bar.update(1)) if not bar.disable else None
        try:
            for batch in batches:
                shown = bar.n
                values.append(algorithm.evaluate_batch(batch, steps=inner_steps, lr=inner_lr,
                                                       transductive=transductive))
                bar.update(shown + batch.num_tasks - bar.n)
        finally:
            algorithm.on_episode = None
    local = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    scores = distributed.gather_cat(local, dist)  # (episodes,) in episode order
    mean, ci = mean_ci95(scores)
    recorded_lr = None if getattr(algorithm, "learns_inner_lr", False) else inner_lr
    return EvalResult(split, episodes, ways, shots, query_shots, inner_steps, recorded_lr, seed, batchnorm,
                      mean, ci, scores.tolist(), transductive, getattr(algorithm, "metric_name", "accuracy"),
                      getattr(algorithm, "has_inner_loop", True))


def run_evaluation(cfg: Any, algorithm, split: str, episodes: int, *, benchmark: Benchmark,
                   progress: bool = False) -> EvalResult:
    """Score `algorithm` on `episodes` fixed episodes of `split` of the (loaded) `benchmark` with the run's
    eval settings (eval.*, defaults from training). Under torchrun the episodes are sharded and gathered."""
    ev = eval_settings(cfg)
    return evaluate(algorithm, None, ways=ev["ways"], shots=ev["shots"], query_shots=ev["query_shots"],
                    episodes=episodes, seed=benchmark.eval_seed(split, cfg.eval.seed), inner_steps=ev["inner_steps"],
                    inner_lr=ev["inner_lr"], batch_size=cfg.eval.batch_size, split=split,
                    batchnorm=benchmark.batchnorm, dtype=getattr(torch, cfg.dtype), progress=progress,
                    transductive=cfg.eval.transductive, benchmark=benchmark)


def eval_runtime(cfg: Any, algorithm) -> Dict[str, Any]:
    """Torch's thread count and the execution path of an evaluation, saved with its result: the same
    checkpoint and episodes give bit-identical accuracies only with the same threads, path and device."""
    plan = algorithm.execution_plan()[0] if cfg.eval.transductive else "loop"
    return {"threads": torch.get_num_threads(), "execution": plan}
