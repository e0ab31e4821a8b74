"""CIFAR-FS and FC100: few-shot splits of CIFAR-100 (Krizhevsky, 2009), 600 32x32 images per class
(the official train and test pickles together).

  * CIFAR-FS (Bertinetto et al., 2019, "Meta-learning with differentiable closed-form solvers"):
    64 / 16 / 20 fine classes (split "bertinetto").
  * FC100 (Oreshkin et al., 2018, "TADAM"): split by superclass so train and test classes are
    semantically far apart: 12 / 4 / 4 superclasses = 60 / 20 / 20 fine classes (split "oreshkin").

Layout: the CIFAR-100 python archive extracted under root: root/cifar-100-python/{train,test,meta}
(or the three files directly in root). The split lists are the standard ones, as in torchmeta.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..errors import MetalearnError
from .base import ImageDataset, load_pickle, split_by_names
from .checks import check_class_lists

CIFAR_FS_VAL = ("beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
                "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor")
CIFAR_FS_TEST = ("whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard",
                 "plain", "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck",
                 "rocket")
FC100_VAL = ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals")
FC100_TEST = ("aquatic_mammals", "insects", "medium_mammals", "people")


class _Cifar100(ImageDataset):
    channels = 3

    def __init__(self, root, image_size: int = 32, cache_dir=None):
        super().__init__(root, image_size, cache_dir)

    def _folder(self) -> Path:
        sub = self.root / "cifar-100-python"
        return sub if sub.is_dir() else self.root

    def _index(self) -> Tuple[List[str], List[int]]:
        folder = self._folder()
        meta = load_pickle(folder / "meta", self.name)
        try:
            self._fine_names = [str(n) for n in meta["fine_label_names"]]
            self._coarse_names = [str(n) for n in meta["coarse_label_names"]]
        except (KeyError, TypeError):
            raise MetalearnError(f"{self.name}: {folder / 'meta'} lacks fine_label_names/coarse_label_names") from None
        data, fine, coarse = [], [], []
        for part in ("train", "test"):
            blob = load_pickle(folder / part, self.name)
            try:
                x = np.asarray(blob["data"], dtype=np.uint8)
                data.append(x.reshape(len(x), 3, 32, 32).transpose(0, 2, 3, 1))
                fine.append(np.asarray(blob["fine_labels"], dtype=np.int64))
                coarse.append(np.asarray(blob["coarse_labels"], dtype=np.int64))
            except (KeyError, TypeError, ValueError) as e:
                raise MetalearnError(f"{self.name}: {folder / part} is not a CIFAR-100 python pickle ({e})") from None
            if len(fine[-1]) != len(data[-1]):
                raise MetalearnError(f"{self.name}: {folder / part} has {len(data[-1])} images "
                                     f"but {len(fine[-1])} labels")
        data, fine, coarse = np.concatenate(data), np.concatenate(fine), np.concatenate(coarse)
        if fine.size and (fine.max() >= len(self._fine_names) or coarse.max() >= len(self._coarse_names)):
            raise MetalearnError(f"{self.name}: labels exceed the names in {folder / 'meta'}")
        self._by_class = [data[fine == c] for c in range(len(self._fine_names))]
        check_class_lists(self.name, {"all": self._fine_names}, {"all": folder / "meta"})
        empty = next((n for n, x in zip(self._fine_names, self._by_class) if not len(x)), None)
        if empty is not None:
            raise MetalearnError(f"{self.name}: class {empty!r} ({folder / 'meta'}) has no images in "
                                 f"{folder / 'train'} or {folder / 'test'}")
        self._superclass = {}
        for c in range(len(self._fine_names)):
            sup = np.unique(coarse[fine == c])
            self._superclass[self._fine_names[c]] = self._coarse_names[int(sup[0])] if sup.size else ""
        return list(self._fine_names), [len(x) for x in self._by_class]

    def _sources(self) -> List[Path]:
        folder = self._folder()
        return [folder / "meta", folder / "train", folder / "test"]

    def _decode(self) -> List[np.ndarray]:
        return self._by_class


def _sized(ds, splits: Dict[str, torch.Tensor], sizes) -> Dict[str, torch.Tensor]:
    got = tuple(len(splits[k]) for k in ("train", "val", "test"))
    if got != tuple(sizes):
        raise MetalearnError(f"{ds.name}: the standard split has {sizes[0]}/{sizes[1]}/{sizes[2]} "
                             f"train/val/test classes, this CIFAR-100 copy gives {got[0]}/{got[1]}/{got[2]}")
    return splits


class CifarFS(_Cifar100):
    name = "cifar-fs"

    def standard_split(self) -> Dict[str, torch.Tensor]:
        rest = set(CIFAR_FS_VAL) | set(CIFAR_FS_TEST)
        sources = {"train": f"the classes of {self._folder() / 'meta'} in neither list",
                   "val": "CIFAR_FS_VAL in metalearn/data/cifar.py", "test": "CIFAR_FS_TEST in metalearn/data/cifar.py"}
        return _sized(self, split_by_names(self.name, self.class_names, {
            "train": [c for c in self.class_names if c not in rest], "val": CIFAR_FS_VAL, "test": CIFAR_FS_TEST},
            sources, self.class_counts), (64, 16, 20))


class FC100(_Cifar100):
    name = "fc100"

    def standard_split(self) -> Dict[str, torch.Tensor]:
        def members(supers):
            return [c for c in self.class_names if self._superclass[c] in supers]
        meta = self._folder() / "meta"
        lists = {"val": FC100_VAL, "test": FC100_TEST}
        check_class_lists(self.name, lists, {k: f"FC100_{k.upper()} in metalearn/data/cifar.py" for k in lists},
                          known=self._coarse_names)  # superclasses: listed once, in one split, known to meta
        rest = set(FC100_VAL) | set(FC100_TEST)
        train = [c for c in self.class_names if self._superclass[c] not in rest]
        sources = {"train": f"the superclasses of {meta} in neither list",
                   "val": f"the classes of FC100_VAL's superclasses in {meta}",
                   "test": f"the classes of FC100_TEST's superclasses in {meta}"}
        return _sized(self, split_by_names(self.name, self.class_names,
                                           {"train": train, "val": members(FC100_VAL), "test": members(FC100_TEST)},
                                           sources, self.class_counts), (60, 20, 20))
