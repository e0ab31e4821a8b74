"""Omniglot (Lake et al., 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

Reads the official layout, either the two zips or their extracted folders, under one root:

    root/images_background.zip  or  root/images_background/<Alphabet>/characterNN/XXXX_YY.png
    root/images_evaluation.zip  or  root/images_evaluation/<Alphabet>/characterNN/XXXX_YY.png

Official archives: https://github.com/brendenlake/omniglot (python/images_background.zip,
python/images_evaluation.zip). The 105x105 1-bit drawings are decoded once, resized with
antialiasing (Lanczos), inverted so that strokes are bright, and cached as one uint8 tensor
of shape (1623, 20, 1, S, S) in the cache folder. The cache key is a fingerprint of the
sources (the zips' bytes, or the PNGs' names and bytes), so a changed source is
decoded again.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import MetalearnError
from .base import CachedImages, default_cache_dir, looks_like_html

PARTS = ("images_background", "images_evaluation")
PART_CHARACTERS = {"images_background": 964, "images_evaluation": 659}
DRAWINGS = 20
CHARACTERS = 1623
URL = "https://github.com/brendenlake/omniglot/tree/master/python"


@dataclass(frozen=True)
class _Part:
    name: str
    path: Path
    is_zip: bool


def _find_parts(root: Path) -> List[_Part]:
    if not root.is_dir():
        raise MetalearnError(f"omniglot: data folder {root} does not exist (set METALEARN_DATA or data.root; "
                             f"get images_background.zip and images_evaluation.zip from {URL})")
    parts = []
    for name in PARTS:
        folder, archive = root / name, root / f"{name}.zip"
        if folder.is_dir():
            parts.append(_Part(name, folder, False))
        elif archive.is_file():
            parts.append(_Part(name, archive, True))
        else:
            raise MetalearnError(f"omniglot: neither {archive} nor {folder}/ exists (get {name}.zip from {URL})")
    return parts


def _list_part(part: _Part) -> Dict[str, List[str]]:
    """character key 'part/Alphabet/characterNN' -> sorted member names (zip) or file paths."""
    chars: Dict[str, List[str]] = {}
    if part.is_zip:
        try:
            with zipfile.ZipFile(part.path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            if part.path.is_file() and looks_like_html(part.path):
                raise MetalearnError(f"omniglot: {part.path} is an HTML page, not a zip file (a failed download? "
                                     f"get {part.name}.zip from {URL})") from None
            raise MetalearnError(f"omniglot: {part.path} is not a readable zip file ({e})") from None
        if len(set(names)) != len(names):
            seen = set()
            twice = next(n for n in names if n in seen or seen.add(n))
            raise MetalearnError(f"omniglot: {part.path} holds {twice} twice")
        for n in names:
            bits = n.split("/")
            if len(bits) == 4 and bits[0] == part.name and bits[3].endswith(".png"):
                chars.setdefault("/".join(bits[:3]), []).append(n)
    else:
        for alphabet in sorted(p for p in part.path.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                pngs = [str(p) for p in char.iterdir() if p.suffix == ".png"]
                chars[f"{part.name}/{alphabet.name}/{char.name}"] = pngs
    if not chars:
        raise MetalearnError(f"omniglot: {part.path} holds no {part.name}/<Alphabet>/<character>/*.png drawings")
    return {k: sorted(v) for k, v in sorted(chars.items())}


def verify_zip(path: Path, part: str) -> None:
    """Check an official zip's structure (used for an archive the user supplied instead of downloading):
    `part` ('images_background' / 'images_evaluation') with its 964 / 659 characters of 20 drawings."""
    expected = PART_CHARACTERS[part]
    chars = _list_part(_Part(part, path, True))
    bad = [k for k, v in chars.items() if len(v) != DRAWINGS]
    if len(chars) != expected or bad:
        raise MetalearnError(f"omniglot: {path} holds {len(chars)} characters (expected {expected})"
                             + (f"; {bad[0]} has {len(chars[bad[0]])} drawings, expected {DRAWINGS}" if bad else ""))


def _fingerprint(parts: Sequence[_Part], image_size: int) -> str:
    h = hashlib.sha256(f"omniglot-v1-{image_size}".encode())
    for part in parts:
        h.update(part.name.encode())
        if part.is_zip:
            with open(part.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            for dirpath, _, files in sorted(os.walk(part.path)):
                for fn in sorted(files):
                    full = os.path.join(dirpath, fn)
                    h.update(os.path.relpath(full, part.path).encode())
                    with open(full, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:20]


def _decode(png: bytes | str, image_size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        im = im.convert("L").resize((image_size, image_size), Image.LANCZOS)
        return 255 - np.asarray(im, dtype=np.uint8)


def _decode_chunk(args: Tuple[str, bool, List[List[str]], int]) -> np.ndarray:
    path, is_zip, characters, image_size = args
    out = np.empty((len(characters), DRAWINGS, image_size, image_size), dtype=np.uint8)
    zf = None
    m = path
    try:
        zf = zipfile.ZipFile(path) if is_zip else None
        for i, members in enumerate(characters):
            for j, m in enumerate(members):
                out[i, j] = _decode(zf.read(m) if zf else m, image_size)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:  # corrupt member, unreadable PNG
        why = " ".join(str(e).split())[:200] or type(e).__name__
        if type(e).__name__ == "UnidentifiedImageError":  # PIL: its message names only a BytesIO object
            why = "not a readable image"
        where = f"{m} in {path}" if is_zip and m != path else str(m)
        raise MetalearnError(f"omniglot: cannot decode {where} ({type(e).__name__}: {why}); the file is damaged, "
                             f"get a fresh copy from {URL}") from None
    finally:
        if zf:
            zf.close()
    return out


class Omniglot(CachedImages):
    """Index on construction (cheap, checks the structure); decode or load the cache on `.images`."""

    name = "omniglot"
    channels = 1

    def __init__(self, root: str | Path, image_size: int = 28, cache_dir: str | Path | None = None,
                 expected_characters: int | None = CHARACTERS):
        self.root = Path(root)
        self.image_size = image_size
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._parts = _find_parts(self.root)
        self._members: Dict[str, List[str]] = {}
        self._part_of: Dict[str, _Part] = {}
        for part in self._parts:
            for key, files in _list_part(part).items():
                if len(files) != DRAWINGS:
                    raise MetalearnError(f"omniglot: {key} in {part.path} has {len(files)} drawings, "
                                         f"expected {DRAWINGS}")
                self._members[key] = files
                self._part_of[key] = part
        self.class_names: List[str] = sorted(self._members)
        if expected_characters is not None and len(self.class_names) != expected_characters:
            raise MetalearnError(f"omniglot: found {len(self.class_names)} characters under {self.root}, "
                                 f"expected {expected_characters}")
        self.samples_per_class = DRAWINGS

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / f"omniglot-{self.image_size}px-{_fingerprint(self._parts, self.image_size)}.pt"

    def _build(self) -> torch.Tensor:
        """Decode every drawing (in parallel over chunks of characters): uint8 (1623, 20, 1, S, S)."""
        jobs = []
        for part in self._parts:
            keys = [k for k in self.class_names if self._part_of[k] is part]
            for start in range(0, len(keys), 64):
                chunk = keys[start:start + 64]
                jobs.append((str(part.path), part.is_zip, [self._members[k] for k in chunk], self.image_size))
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        if workers > 1:
            pool = ProcessPoolExecutor(workers)
            try:
                chunks = list(pool.map(_decode_chunk, jobs))
            finally:  # a damaged file: stop at once instead of decoding the remaining chunks
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            chunks = [_decode_chunk(j) for j in jobs]
        return torch.from_numpy(np.concatenate(chunks)).unsqueeze(2).contiguous()

