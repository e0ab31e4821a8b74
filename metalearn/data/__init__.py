"""Data sets, class splits and episode samplers.

Every image data set has `.images` uint8 (classes, per_class, C, H, W), `.channels`,
`.samples_per_class` and `.class_names`; `open_dataset(cfg.data)` returns it with its class
split {"train": idx, "val": idx, "test": idx} (disjoint int64 class indices into `.images`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict

from ..errors import MetalearnError
from .base import ImageDataset
from .checks import check_class_lists, format_report, split_report
from .cifar import FC100, CifarFS
from .download import download_cifar100, download_omniglot, fetch, safe_extract
from .folder import ImageFolder
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot
from .rotation import RotatedClasses
from .sampler import EpisodeSampler, check_episode_fits, fixed_episodes
from .sinusoid import PROTOCOLS as SINUSOID_PROTOCOLS
from .sinusoid import SinusoidSampler, fixed_sinusoid_episodes
from .splits import check_disjoint, omniglot_lake_split, omniglot_maml_split, omniglot_vinyals_split, seeded_split
from .tiered import TieredImageNet

DATASETS = {"omniglot": Omniglot, "mini-imagenet": MiniImageNet, "tiered-imagenet": TieredImageNet,
            "cifar-fs": CifarFS, "fc100": FC100, "folder": ImageFolder}

REGRESSION = {"sinusoid": SINUSOID_PROTOCOLS}
"""Synthetic regression task families (no images, no class splits): name -> protocols, chosen by data.split
(sinusoid: `maml` = phase U[0, pi] as Finn et al., `reptile` = phase U[0, 2 pi] as Nichol et al.)."""


def _standard(ds, seed: int):
    return ds.standard_split()


# data set -> split name -> fn(dataset, split_seed) -> {"train", "val", "test"} class indices
SPLITS: Dict[str, Dict[str, Callable]] = {
    "omniglot": {"maml": lambda ds, seed: omniglot_maml_split(seed),
                 "vinyals": lambda ds, seed: omniglot_vinyals_split(ds.class_names),
                 "lake": lambda ds, seed: omniglot_lake_split(ds.class_names)},
    "mini-imagenet": {"standard": _standard},
    "tiered-imagenet": {"standard": _standard},
    "cifar-fs": {"standard": _standard},
    "fc100": {"standard": _standard},
    "folder": {"file": _standard},
}


def data_root(dataset: str, root: str = "") -> Path:
    """`root` if given, else $METALEARN_DATA/<dataset>."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("METALEARN_DATA")
    if not env:
        raise MetalearnError(f"no data folder: set METALEARN_DATA (the folder holding {dataset}/) or data.root")
    return Path(env).expanduser() / dataset


def open_dataset(cfg) -> "tuple[ImageDataset | Omniglot | RotatedClasses, dict]":
    """(dataset, split name -> class indices) for a DataConfig. Omniglot, the CSV mini-ImageNet layout
    and image folders index cheaply and decode on first `.images`; pickle layouts load on opening.
    data.rotation=classes returns a `RotatedClasses` view with a 4x class pool for data.rotation_splits."""
    if cfg.dataset in REGRESSION:
        raise MetalearnError(f"{cfg.dataset} tasks are generated, not read from a data set (use SinusoidSampler)")
    if cfg.dataset not in DATASETS:
        raise MetalearnError(f"unknown data set {cfg.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    splits = SPLITS[cfg.dataset]
    if cfg.split not in splits:
        raise MetalearnError(f"data.split: unknown split {cfg.split!r} for {cfg.dataset}; "
                             f"known: {', '.join(sorted(splits))}")
    root, cache = data_root(cfg.dataset, cfg.root), cfg.cache_dir or None
    if cfg.dataset == "folder":
        ds = ImageFolder(root, image_size=cfg.image_size, cache_dir=cache, split_file=getattr(cfg, "split_file", ""))
    else:
        ds = DATASETS[cfg.dataset](root, image_size=cfg.image_size, cache_dir=cache)
    split = splits[cfg.split](ds, cfg.split_seed)  # split files are checked here (metalearn/data/checks.py)
    ds.split_check = split  # pixel-identical images across splits: one warning when .images is first loaded
    if getattr(cfg, "rotation", "none") == "classes":
        ds = RotatedClasses(ds)
        split = ds.split(split, list(cfg.rotation_splits))
    return ds, split


__all__ = ["DATASETS", "REGRESSION", "SINUSOID_PROTOCOLS", "SPLITS", "CifarFS", "EpisodeSampler", "FC100",
           "ImageDataset", "ImageFolder", "MiniImageNet", "Omniglot", "RotatedClasses", "SinusoidSampler",
           "TieredImageNet", "check_class_lists", "check_disjoint", "check_episode_fits", "data_root", "format_report",
           "split_report", "download_cifar100", "download_omniglot", "fetch", "fixed_episodes",
           "fixed_sinusoid_episodes", "omniglot_lake_split", "omniglot_maml_split", "omniglot_vinyals_split",
           "open_dataset", "safe_extract", "seeded_split"]
