"""tiered-ImageNet (Ren et al., 2018, "Meta-Learning for Semi-Supervised Few-Shot Classification"):
608 ImageNet classes grouped into 34 super-categories, 351 / 97 / 160 train / val / test classes
split by super-category (split "ren").

Layout (Ren et al.'s release, also what learn2learn downloads), under root:
  {train,val,test}_images_png.pkl : a list (or array) of PNG-encoded images (bytes / uint8 arrays)
  {train,val,test}_labels.pkl     : a dict with "label_specific" (n,) ints and optionally
                                    "label_specific_str" (the class names, indexed by label)
Classes have 732 to 1300 images; every class is truncated to the smallest count (see base.py).
(Pickles can run code when loaded: only open files you trust.)
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..errors import MetalearnError
from .base import ImageDataset, load_pickle, split_by_names
from .checks import check_class_lists

SPLIT_NAMES = ("train", "val", "test")


class TieredImageNet(ImageDataset):
    name = "tiered-imagenet"
    channels = 3

    def __init__(self, root, image_size: int = 84, cache_dir=None):
        super().__init__(root, image_size, cache_dir)

    def _index(self) -> Tuple[List[str], List[int]]:
        self._rows: Dict[str, Tuple[str, np.ndarray]] = {}
        self._split_of: Dict[str, List[str]] = {}
        for split in SPLIT_NAMES:
            labels_path = self.root / f"{split}_labels.pkl"
            blob = load_pickle(labels_path, self.name)
            if not isinstance(blob, dict) or "label_specific" not in blob:
                raise MetalearnError(f"{self.name}: {labels_path} is not a dict with 'label_specific'")
            labels = np.asarray(blob["label_specific"], dtype=np.int64).reshape(-1)
            strs = blob.get("label_specific_str")
            if labels.size and labels.min() < 0:
                raise MetalearnError(f"{self.name}: {labels_path} has a negative label ({int(labels.min())})")
            if strs is not None and labels.size and labels.max() >= len(strs):
                raise MetalearnError(f"{self.name}: {labels_path}: label {int(labels.max())} has no name in "
                                     f"label_specific_str ({len(strs)} names)")
            labs = range(len(strs)) if strs is not None else np.unique(labels).tolist()
            names = [str(strs[lab]) if strs is not None else f"{split}-{lab}" for lab in labs]
            for lab, name in zip(labs, names):  # a name listed twice, or without images: refused below
                self._rows.setdefault(name, (split, np.flatnonzero(labels == lab)))
            self._split_of[split] = names
            if not (self.root / f"{split}_images_png.pkl").is_file():
                raise MetalearnError(f"{self.name}: {self.root / f'{split}_images_png.pkl'} does not exist")
        check_class_lists(self.name, self._split_of, self._label_files(),
                          counts={n: len(rows) for n, (_, rows) in self._rows.items()})
        names = [n for s in SPLIT_NAMES for n in self._split_of[s]]
        return names, [len(self._rows[n][1]) for n in names]

    def _label_files(self) -> Dict[str, Path]:
        return {s: self.root / f"{s}_labels.pkl" for s in SPLIT_NAMES}

    def _sources(self) -> List[Path]:
        return [self.root / f"{s}_{kind}.pkl" for s in SPLIT_NAMES for kind in ("images_png", "labels")]

    def _decode(self) -> List[np.ndarray]:
        from PIL import Image

        P = self.samples_per_class
        out: Dict[str, np.ndarray] = {}
        for split in SPLIT_NAMES:
            path = self.root / f"{split}_images_png.pkl"
            pngs = load_pickle(path, self.name)
            for name in self._split_of[split]:
                rows = self._rows[name][1][:P]
                imgs = []
                for r in rows:
                    if r >= len(pngs):
                        raise MetalearnError(f"{self.name}: {path} has {len(pngs)} images, labels index row {r}")
                    try:
                        with Image.open(io.BytesIO(bytes(np.asarray(pngs[r], dtype=np.uint8)))) as im:
                            im = im.convert("RGB")
                            if im.size != (self.image_size, self.image_size):
                                im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
                            imgs.append(np.asarray(im, dtype=np.uint8))
                    except (OSError, ValueError) as e:
                        raise MetalearnError(f"{self.name}: image {r} of {path} is not a readable PNG ({e})") from None
                out[name] = np.stack(imgs)
        return [out[n] for n in self.class_names]

    def standard_split(self) -> Dict[str, torch.Tensor]:
        return split_by_names(self.name, self.class_names, self._split_of, self._label_files(), self.class_counts)
