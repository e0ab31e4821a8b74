"""Any image folder: root/<class>/<image>.{png,jpg,jpeg,bmp,gif,webp}, one subfolder per class,
with a user-supplied split file (JSON): {"train": [class folder names], "val": [...], "test": [...]}.

Images are decoded with PIL to RGB (or to grayscale when every image of the first class is
single-channel), resized to image_size x image_size. Unequal counts: truncated to the smallest
class (see base.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..errors import MetalearnError
from .base import ImageDataset, split_by_names

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class ImageFolder(ImageDataset):
    name = "folder"

    def __init__(self, root, image_size: int = 84, cache_dir=None, split_file: str | Path = ""):
        self.split_file = Path(split_file) if split_file else None
        super().__init__(root, image_size, cache_dir)

    def _index(self) -> Tuple[List[str], List[int]]:
        if not self.root.is_dir():
            raise MetalearnError(f"folder: {self.root} is not a folder")
        self._files: Dict[str, List[Path]] = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in EXTENSIONS)
            if not files:
                raise MetalearnError(f"folder: class {d.name!r} has no images ({d}/ holds no "
                                     f"{'/'.join(sorted(e[1:] for e in EXTENSIONS))} files)")
            self._files[d.name] = files
        if not self._files:
            raise MetalearnError(f"folder: {self.root} holds no class subfolders")
        from PIL import Image

        first = next(iter(self._files.values()))
        modes = set()
        for p in first[:5]:
            with Image.open(p) as im:
                modes.add(im.mode)
        self.channels = 1 if modes and modes <= {"L", "1", "I;16", "I"} else 3
        names = list(self._files)
        return names, [len(self._files[n]) for n in names]

    def _sources(self) -> List[Path]:
        return [f for n in self.class_names for f in self._files[n]]

    def _decode(self) -> List[np.ndarray]:
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        out = []
        for n in self.class_names:
            imgs = []
            for p in self._files[n][: self.samples_per_class]:
                try:
                    with Image.open(p) as im:
                        im = im.convert(mode).resize((self.image_size, self.image_size), Image.BILINEAR)
                        imgs.append(np.asarray(im, dtype=np.uint8))
                except (OSError, ValueError) as e:
                    raise MetalearnError(f"folder: cannot read image {p} ({e})") from None
            out.append(np.stack(imgs))
        return out

    def standard_split(self) -> Dict[str, torch.Tensor]:
        if self.split_file is None:
            raise MetalearnError("folder: set data.split_file to a JSON file "
                                 "{\"train\": [...], \"val\": [...], \"test\": [...]}")
        try:
            text = self.split_file.read_text()
            spec = json.loads(text, object_pairs_hook=lambda pairs: _no_repeated_keys(pairs, self.split_file))
        except FileNotFoundError:
            raise MetalearnError(f"folder: split file {self.split_file} does not exist") from None
        except (OSError, ValueError) as e:
            raise MetalearnError(f"folder: split file {self.split_file} is not valid JSON ({e})") from None
        if not isinstance(spec, dict) or set(spec) != {"train", "val", "test"} or \
                not all(isinstance(v, list) for v in spec.values()):
            raise MetalearnError(f"folder: split file {self.split_file} must be a JSON object with exactly the "
                                 f"lists 'train', 'val' and 'test'")
        bad = next(((k, v) for k, names in spec.items() for v in names if not isinstance(v, str)), None)
        if bad:
            raise MetalearnError(f"folder: split file {self.split_file}: the {bad[0]} list holds {bad[1]!r}, "
                                 f"not a class folder name")
        splits = split_by_names("folder", self.class_names, spec, {k: self.split_file for k in spec}, self.class_counts)
        self._check_no_file_in_two_splits(spec)
        return splits

    def _check_no_file_in_two_splits(self, spec: Dict[str, List[str]]) -> None:
        """The same image file (a symlink or hard link: same device and inode) in two splits' class folders."""
        seen: Dict[Tuple[int, int], Tuple[str, Path]] = {}
        for split, names in spec.items():
            for name in names:
                for p in self._files[name]:
                    st = p.stat()
                    key = (st.st_dev, st.st_ino)
                    if key in seen and seen[key][0] != split:
                        raise MetalearnError(f"folder: image {p} ({split}) is the same file as {seen[key][1]} "
                                             f"({seen[key][0]}); split file {self.split_file}")
                    seen.setdefault(key, (split, p))


def _no_repeated_keys(pairs: List[Tuple[str, object]], path: Path) -> dict:
    """json object hook: a key given twice (e.g. two "train" lists, the first silently lost) is an error."""
    keys = [k for k, _ in pairs]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated is not None:
        raise MetalearnError(f"folder: split file {path} gives {repeated!r} twice")
    return dict(pairs)
