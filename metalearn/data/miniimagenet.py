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
from .checks import check_class_lists

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
            image_at: Dict[str, Tuple[Path, int, str]] = {}  # filename -> (csv, line, label) where first listed
            class_at: Dict[str, Tuple[Path, int]] = {}        # label -> (csv, line) where first listed
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
                    fname, label = row[0], row[1]
                    if fname in image_at:  # a duplicated line, one image in two classes, or in two splits
                        p0, l0, c0 = image_at[fname]
                        if p0 == path and c0 == label:
                            raise MetalearnError(f"mini-imagenet: {path} line {line} duplicates line {l0} ({fname!r})")
                        raise MetalearnError(f"mini-imagenet: image {fname!r} is listed in both {p0} line {l0} "
                                             f"(class {c0!r}) and {path} line {line} (class {label!r})")
                    image_at[fname] = (path, line, label)
                    if label in class_at and class_at[label][0] != path:
                        p0, l0 = class_at[label]
                        raise MetalearnError(f"mini-imagenet: class {label!r} is in both {p0} (line {l0}) and "
                                             f"{path} (line {line})")
                    if label not in self._files:
                        class_at[label] = (path, line)
                        self._files[label] = []
                        names.append(label)
                    self._files[label].append(self.root / "images" / fname)
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
                    raise MetalearnError(f"mini-imagenet: {self.root / fname} is not a dict "
                                         f"with 'image_data' and 'class_dict'")
                data = np.asarray(blob["image_data"])
                self._split_of[split] = list(blob["class_dict"])
                owner: Dict[int, str] = {}  # row -> the class that lists it
                for cname, rows in blob["class_dict"].items():
                    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
                    if rows.size and (rows.min() < 0 or rows.max() >= len(data)):
                        raise MetalearnError(f"mini-imagenet: {self.root / fname}: class {cname!r} indexes rows "
                                             f"outside image_data's {len(data)}")
                    for r in rows.tolist():
                        if r in owner:
                            what = "twice" if owner[r] == cname else f"and so does class {owner[r]!r}"
                            raise MetalearnError(f"mini-imagenet: {self.root / fname}: class {cname!r} lists image "
                                                 f"row {r} {what}")
                        owner[r] = cname
                    if cname in self._arrays:  # checked below with the files named; keep the first split's rows
                        continue
                    self._arrays[cname] = data[rows]
            check_class_lists(self.name, self._split_of, {s: self.root / f for s, f in PICKLE_FILES.items()},
                              counts={n: len(a) for n, a in self._arrays.items()})
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
        sources = ({s: self.root / f"{s}.csv" for s in CSV_SPLITS} if self.layout == "csv"
                   else {s: self.root / f for s, f in PICKLE_FILES.items()})
        return split_by_names(self.name, self.class_names, self._split_of, sources, self.class_counts)
