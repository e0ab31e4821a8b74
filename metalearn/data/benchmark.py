"""A benchmark: the family of tasks a run is trained and scored on, built from the config.

`open_benchmark(cfg)` gives one of two kinds, with one interface, so that the training loop,
the evaluation and the command line never ask which kind they have:

    ImageBenchmark       N-way K-shot classification on the class splits of an image data set
                         (data.dataset = omniglot, mini-imagenet, ..., folder)
    SinusoidBenchmark    K-shot sinusoid regression (data.dataset = sinusoid; data.split = protocol),
                         tasks generated on the device, no data set

What a benchmark says:

    loss, metric          "cross_entropy" and "accuracy", or "mse" and "mse"
    channels, outputs     the model's input channels and outputs (data.ways; 1 for regression)
    batchnorm             the BatchNorm mode recorded with an evaluation (model.batchnorm; "none" for the MLP)
    description, tag      "omniglot 5-way 1-shot" / "sinusoid 5-shot" (titles); "omniglot-5w1s" (run names)
    check_episodes(...)   an episode shape fits a split: one-line error before any work
    load(device)          decode the images once (cached) and put them on the device
    sampler(seed, dtype)  the training sampler: sample(T, part=), state_dict(), load_state_dict();
                          data.augment wraps it in an AugmentedSampler (metalearn/data/augment.py)
    eval_seed(split, s)   the seed that fixes a split's evaluation episodes
    episodes(split, ...)  the fixed evaluation episodes of a split, in batches

`synthetic_benchmark(cfg)` is an image benchmark over random pixels of the data set's shape
(`metalearn bench`: no data needed).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import torch
from torch import Tensor

from ..types import TaskBatch
from . import DATASETS, REGRESSION, open_dataset
from .augment import AugmentedSampler
from .sampler import EpisodeSampler, check_episode_fits, fixed_episodes
from .sinusoid import SinusoidSampler, fixed_sinusoid_episodes


class Benchmark:
    """What every benchmark has (see the module docstring); the two kinds below fill it in."""

    loss: str
    metric: str
    channels: int
    outputs: int
    batchnorm: str
    description: str
    tag: str

    def check_episodes(self, split: str, ways: int, shots: int, query_shots: int) -> None:
        raise NotImplementedError

    def load(self, device: torch.device) -> None:
        raise NotImplementedError

    def sampler(self, seed: int, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def eval_seed(self, split: str, seed: int) -> int:
        raise NotImplementedError

    def episodes(self, split: str, *, ways: int, shots: int, query_shots: int, count: int, seed: int,
                 batch_size: int, dtype: torch.dtype, start: int = 0) -> Iterator[TaskBatch]:
        raise NotImplementedError


class ImageBenchmark(Benchmark):
    """N-way K-shot classification on the disjoint class splits of an image data set.

    dataset: what `open_dataset` returns (`.images` uint8 (classes, per_class, C, H, W), `.channels`,
    `.samples_per_class`); splits: {"train", "val", "test"} -> int64 class indices into `.images`.
    """

    loss, metric = "cross_entropy", "accuracy"

    def __init__(self, cfg: Any, dataset: Any, splits: Dict[str, Tensor]):
        self.data, self.dataset, self.splits = cfg.data, dataset, splits
        d = cfg.data
        self.channels, self.outputs, self.batchnorm = dataset.channels, d.ways, cfg.model.batchnorm
        self.description = f"{d.dataset} {d.ways}-way {d.shots}-shot"
        self.tag = f"{d.dataset}-{d.ways}w{d.shots}s"
        self.images: Optional[Tensor] = None
        """uint8 (classes, per_class, C, H, W) of every class, on the device, once `load`ed."""

    def classes(self, split: str) -> int:
        return len(self.splits[split])

    def check_episodes(self, split: str, ways: int, shots: int, query_shots: int) -> None:
        check_episode_fits(split, len(self.splits[split]), self.dataset.samples_per_class, ways, shots, query_shots)

    def load(self, device: torch.device) -> None:
        self.images = self.dataset.images.to(device)

    def split_images(self, split: str) -> Tensor:
        """uint8 (classes of the split, per_class, C, H, W) on the device (after `load`)."""
        return self.images[self.splits[split].to(self.images.device)]

    def sampler(self, seed: int, dtype: torch.dtype) -> EpisodeSampler | AugmentedSampler:
        """Meta-batches of data.ways-way data.shots-shot tasks of the training classes, drawn on the device;
        data.rotation=per_task rotates each class of a task by a random multiple of 90 degrees; data.augment
        augments the images of data.augment_sets (metalearn/data/augment.py; the evaluation episodes never)."""
        d = self.data
        sampler = EpisodeSampler(self.split_images("train"), d.ways, d.shots, d.query_shots, seed=seed, split="train",
                                 dtype=dtype, rotate=d.rotation == "per_task")
        if d.augment:
            return AugmentedSampler(sampler, d.augment, d.augment_sets, seed=seed)
        return sampler

    def eval_seed(self, split: str, seed: int) -> int:
        return seed  # the splits' classes are disjoint: one seed gives each split its own episodes

    def episodes(self, split: str, *, ways: int, shots: int, query_shots: int, count: int, seed: int,
                 batch_size: int, dtype: torch.dtype, start: int = 0) -> Iterator[TaskBatch]:
        return fixed_episodes(self.split_images(split), ways, shots, query_shots, count=count, seed=seed,
                              batch_size=batch_size, split=split, dtype=dtype, start=start)


class SinusoidBenchmark(Benchmark):
    """K-shot sinusoid regression (metalearn/data/sinusoid.py), data.split = the protocol (maml, reptile).

    The tasks have no class splits: the evaluation episodes of split s are fixed by the seed
    eval.seed + EVAL_SEED_OFFSET[s], so that test, val and train draw different tasks."""

    loss, metric = "mse", "mse"
    channels, outputs, batchnorm = 1, 1, "none"
    EVAL_SEED_OFFSET = {"test": 0, "val": 1, "train": 2}

    def __init__(self, cfg: Any):
        data = cfg.data
        self.data, self.protocol = data, data.split
        self.description = f"{data.dataset} {data.shots}-shot"
        self.tag = f"{data.dataset}-{data.shots}s"
        self.device = torch.device("cpu")

    def check_episodes(self, split: str, ways: int, shots: int, query_shots: int) -> None:
        pass  # generated: any number of points per task

    def load(self, device: torch.device) -> None:
        self.device = device

    def sampler(self, seed: int, dtype: torch.dtype) -> SinusoidSampler:
        d = self.data
        return SinusoidSampler(d.shots, d.query_shots, protocol=self.protocol, seed=seed, device=self.device,
                               dtype=dtype)

    def eval_seed(self, split: str, seed: int) -> int:
        return seed + self.EVAL_SEED_OFFSET[split]

    def episodes(self, split: str, *, ways: int, shots: int, query_shots: int, count: int, seed: int,
                 batch_size: int, dtype: torch.dtype, start: int = 0) -> Iterator[TaskBatch]:
        return fixed_sinusoid_episodes(shots, query_shots, count=count, seed=seed, batch_size=batch_size,
                                       protocol=self.protocol, device=self.device, dtype=dtype, start=start)


def benchmark_kind(cfg: Any) -> type:
    """The Benchmark class of a Config (its loss and metric are class attributes), without opening data."""
    return SinusoidBenchmark if cfg.data.dataset in REGRESSION else ImageBenchmark


def open_benchmark(cfg: Any) -> Benchmark:
    """The benchmark of a Config (its data.* and model.batchnorm). Opening an image data set is cheap
    (nothing is decoded before `load`) and checks its split files."""
    if cfg.data.dataset in REGRESSION:
        return SinusoidBenchmark(cfg)
    dataset, splits = open_dataset(cfg.data)
    return ImageBenchmark(cfg, dataset, splits)


def synthetic_benchmark(cfg: Any) -> Benchmark:
    """cfg's benchmark on random uint8 images of its data set's shape (max(4 ways, 64) classes of shots +
    query_shots images, seeded by cfg.seed; every split holds them all): timing without the data.
    Generated tasks are synthetic already: the real benchmark."""
    d = cfg.data
    if d.dataset in REGRESSION:
        return SinusoidBenchmark(cfg)
    channels = DATASETS[d.dataset].channels
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (max(4 * d.ways, 64), d.shots + d.query_shots, channels, d.image_size, d.image_size),
                           generator=g, dtype=torch.uint8)
    every = torch.arange(images.shape[0])
    return ImageBenchmark(cfg, _Pixels(images, channels), {"train": every, "val": every, "test": every})


class _Pixels:
    """A stand-in data set holding given images (synthetic_benchmark)."""

    def __init__(self, images: Tensor, channels: int):
        self.images, self.channels, self.samples_per_class = images, channels, images.shape[1]


__all__ = ["Benchmark", "ImageBenchmark", "SinusoidBenchmark", "open_benchmark", "synthetic_benchmark"]
