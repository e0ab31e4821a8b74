"""mini-ImageNet (Vinyals et al., 2016) with Ravi & Larochelle's (2017) class split: 64 train /
16 val / 20 test classes of 600 images each.

Two layouts under root (the first found wins):
  * Ravi & Larochelle's CSV layout: root/images/<file>.jpg and root/{train,val,test}.csv with a
    header `filename,label`; images are decoded with PIL to RGB.
  * learn2learn's pickle layout: root/mini-imagenet-cache-{train,validation,test}.pkl, each a dict
    {"image_data": uint8 (n, 84, 84, 3), "class_dict": {class name: [row indices]}}.
    (Pickles can run code when loaded: only open files you trust.)
Classes are ordered train, then val, then test, each in file order; the split is read from the
layout itself (split name "standard").
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..errors import MetalearnError
from .base import ImageDataset, load_pickle, split_by_names

CSV_SPLITS = ("train", "val", "test")
PICKLE_FILES = {"train": "mini-imagenet-cache-train.pkl", "val": "mini-imagenet-cache-validation.pkl",
                "test": "mini-imagenet-cache-test.pkl"}


class MiniImageNet(ImageDataset):
    name = "mini-imagenet"
    channels = 3

    def __init__(self, root, image_size: int = 84, cache_dir=None):
        super().__init__(root, image_size, cache_dir)

    def _index(self) -> Tuple[List[str], List[int]]:
        if (self.root / "train.csv").is_file() or (self.root / "images").is_dir():
            self.layout = "csv"
            self._files: Dict[str, List[Path]] = {}
            self._split_of: Dict[str, List[str]] = {}
            for split in CSV_SPLITS:
                path = self.root / f"{split}.csv"
                if not path.is_file():
                    raise MetalearnError(f"mini-imagenet: {path} does not exist (the CSV layout needs images/ and "
                                         f"train.csv, val.csv, test.csv)")
                with open(path, newline="") as f:
                    rows = list(csv.reader(f))
                if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
                    raise MetalearnError(f"mini-imagenet: {path} does not start with the header 'filename,label'")
                names = []
                for line, row in enumerate(rows[1:], start=2):
                    if len(row) < 2:
                        raise MetalearnError(f"mini-imagenet: {path} line {line} is not 'filename,label'")
                    if row[1] not in self._files:
                        self._files[row[1]] = []
                        names.append(row[1])
                    self._files[row[1]].append(self.root / "images" / row[0])
                self._split_of[split] = names
            for files in self._files.values():
                for p in files[:1] + files[-1:]:  # cheap structural check; every file is read on decode
                    if not p.is_file():
                        raise MetalearnError(f"mini-imagenet: {p} (listed in a CSV) does not exist")
            names = [n for s in CSV_SPLITS for n in self._split_of[s]]
            return names, [len(self._files[n]) for n in names]
        if any((self.root / f).is_file() for f in PICKLE_FILES.values()):
            self.layout = "pickle"
            self._arrays: Dict[str, np.ndarray] = {}
            self._split_of = {}
            for split, fname in PICKLE_FILES.items():
                blob = load_pickle(self.root / fname, "mini-imagenet")
                if not isinstance(blob, dict) or "image_data" not in blob or "class_dict" not in blob:
                    raise MetalearnError(f"mini-imagenet: {self.root / fname} is not a dict with 'image_data' and 'class_dict'")
                data = np.asarray(blob["image_data"])
                self._split_of[split] = list(blob["class_dict"])
                for cname, rows in blob["class_dict"].items():
                    rows = np.asarray(rows, dtype=np.int64)
                    if rows.size and (rows.min() < 0 or rows.max() >= len(data)):
                        raise MetalearnError(f"mini-imagenet: {self.root / fname}: class {cname!r} indexes rows "
                                             f"outside image_data's {len(data)}")
                    self._arrays[cname] = data[rows]
            names = [n for s in CSV_SPLITS for n in self._split_of[s]]
            return names, [len(self._arrays[n]) for n in names]
        raise MetalearnError(f"mini-imagenet: {self.root} holds neither images/ + train.csv/val.csv/test.csv "
                             f"nor mini-imagenet-cache-{{train,validation,test}}.pkl")

    def _sources(self) -> List[Path]:
        if self.layout == "csv":
            return [self.root / f"{s}.csv" for s in CSV_SPLITS]
        return [self.root / f for f in PICKLE_FILES.values()]

    def _decode(self) -> List[np.ndarray]:
        if self.layout == "pickle":
            return [self._arrays[n] for n in self.class_names]
        from PIL import Image

        out = []
        P = self.samples_per_class
        for n in self.class_names:
            imgs = []
            for p in self._files[n][:P]:
                try:
                    with Image.open(p) as im:
                        im = im.convert("RGB")
                        if im.size != (self.image_size, self.image_size):
                            im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
                        imgs.append(np.asarray(im, dtype=np.uint8))
                except (OSError, ValueError) as e:
                    raise MetalearnError(f"mini-imagenet: cannot read image {p} ({e})") from None
            out.append(np.stack(imgs))
        return out

    def standard_split(self) -> Dict[str, torch.Tensor]:
        return split_by_names(self.name, self.class_names, self._split_of)
