"""Data sets, class splits and episode samplers."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import MetalearnError
from .omniglot import Omniglot
from .sampler import EpisodeSampler, check_episode_fits, fixed_episodes
from .splits import check_disjoint, omniglot_maml_split, seeded_split

DATASETS = {"omniglot": Omniglot}
SPLITS = {"omniglot": {"maml": omniglot_maml_split}}


def data_root(dataset: str, root: str = "") -> Path:
    """`root` if given, else $METALEARN_DATA/<dataset>."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("METALEARN_DATA")
    if not env:
        raise MetalearnError(f"no data folder: set METALEARN_DATA (the folder holding {dataset}/) or data.root")
    return Path(env).expanduser() / dataset


def open_dataset(cfg) -> "tuple[Omniglot, dict]":
    """(dataset, split name -> class indices) for a DataConfig; cheap: images decode on first use."""
    if cfg.dataset not in DATASETS:
        raise MetalearnError(f"unknown data set {cfg.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    splits = SPLITS[cfg.dataset]
    if cfg.split not in splits:
        raise MetalearnError(f"data.split: unknown split {cfg.split!r} for {cfg.dataset}; known: {', '.join(sorted(splits))}")
    ds = DATASETS[cfg.dataset](data_root(cfg.dataset, cfg.root), image_size=cfg.image_size, cache_dir=cfg.cache_dir or None)
    return ds, splits[cfg.split](cfg.split_seed)


__all__ = ["DATASETS", "SPLITS", "EpisodeSampler", "Omniglot", "check_disjoint", "check_episode_fits",
           "data_root", "fixed_episodes", "omniglot_maml_split", "open_dataset", "seeded_split"]
