"""The shared machinery of the image data sets: index cheaply, decode once, cache a uint8 tensor.

A data set subclass implements
  `_index()`  -> (class_names, per-class example counts): cheap where the layout allows, and
                 checks the layout (missing files raise MetalearnError naming the file);
  `_sources()`-> the files whose (name, size, mtime) fingerprint keys the decode cache;
  `_decode()` -> per class (in class_names order), a uint8 array (n_i, H, W, C) or (n_i, H, W).
The base class resizes to `image_size` (antialiased bilinear, on the CPU), truncates every class
to the smallest count, and caches uint8 (classes, per_class, C, S, S) atomically (a kill leaves
no half-written cache).

Unequal counts per class (tiered-ImageNet, image folders): every class is truncated to the
smallest count (its first examples in file order) with a printed warning, so that `.images`
stays one dense tensor that the vectorised sampler indexes without masks.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .._io import atomic_torch_save
from ..errors import MetalearnError


def looks_like_html(path: str | Path) -> bool:
    """True if the file starts (after whitespace / a BOM) with an HTML or XML tag: a login, quota or error
    page saved in place of a data file (used by the downloads and by the readers' error messages)."""
    with open(path, "rb") as f:
        head = f.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--"))


def default_cache_dir() -> Path:
    env = os.environ.get("METALEARN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "metalearn"


def fingerprint(paths: Sequence[Path], salt: str) -> str:
    """sha256 over each file's name, size and modification time (cheap for multi-GB pickles)."""
    h = hashlib.sha256(salt.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def to_nchw(array: np.ndarray, channels: int, what: str) -> torch.Tensor:
    """uint8 (n, H, W) or (n, H, W, C) -> uint8 (n, channels, H, W)."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise MetalearnError(f"{what}: expected uint8 images, got {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise MetalearnError(f"{what}: expected images of shape (n, H, W[, 1|3]), got {tuple(a.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    if t.shape[1] != channels:
        t = t.expand(-1, 3, -1, -1) if channels == 3 else t.float().mean(1, keepdim=True).round().to(torch.uint8)
    return t.contiguous()


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (n, C, H, W) -> uint8 (n, C, size, size); antialiased bilinear; identity when already that size."""
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class CachedImages:
    """`.images` for a data set: loaded from `cache_path` if it holds these classes, else built once by
    `_build()` and cached atomically (older caches of the same data set and size are removed)."""

    _images: "torch.Tensor | None" = None
    split_check: "Dict[str, torch.Tensor] | None" = None
    """Set by open_dataset to the class split: on first loading `.images`, images pixel-identical across
    its splits are counted (content hashes kept beside the cache) and reported as one warning."""

    @property
    def images(self) -> torch.Tensor:
        """uint8 (classes, samples_per_class, C, S, S) in class_names order."""
        if self._images is None:
            path = self.cache_path
            images = read_cache(path, self.class_names)
            if images is None:  # the first use: can take a minute (Omniglot: ~32k PNGs), so say what happens
                print(f"decoding {self.name} (first use; cached afterwards) ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                images = self._build()
                write_cache(path, self.class_names, images, stale=f"{self.name}-{self.image_size}px-*.pt")
                print(f"decoded {self.name} in {time.perf_counter() - t0:.1f} s; cached in {path}", file=sys.stderr,
                      flush=True)
            self._images = images
            if self.split_check is not None:
                from .checks import warn_identical_images

                warn_identical_images(self, self.split_check, path)
        return self._images


class ImageDataset(CachedImages):
    """Base of the image data sets: `.images` uint8 (classes, per_class, C, S, S), `.class_names`,
    `.channels`, `.samples_per_class` (the smallest class's count), `.class_counts` (before truncation)."""

    name = "images"
    channels = 3

    def __init__(self, root: str | Path, image_size: int, cache_dir: str | Path | None = None):
        self.root = Path(root)
        self.image_size = int(image_size)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        if not self.root.exists():
            raise MetalearnError(f"{self.name}: data folder {self.root} does not exist "
                                 f"(set METALEARN_DATA or data.root)")
        names, counts = self._index()
        if not names:
            raise MetalearnError(f"{self.name}: no classes found under {self.root}")
        self.class_names: List[str] = list(names)
        self.class_counts: List[int] = [int(c) for c in counts]
        self.samples_per_class = min(self.class_counts)
        if self.samples_per_class == 0:
            empty = self.class_names[self.class_counts.index(0)]
            raise MetalearnError(f"{self.name}: class {empty!r} has no images")
        if max(self.class_counts) != self.samples_per_class:
            warnings.warn(f"{self.name}: classes have {self.samples_per_class} to {max(self.class_counts)} images; "
                          f"every class is truncated to {self.samples_per_class}", stacklevel=2)

    # --- for subclasses -------------------------------------------------------------------
    def _index(self) -> Tuple[List[str], List[int]]:
        raise NotImplementedError

    def _sources(self) -> List[Path]:
        raise NotImplementedError

    def _decode(self) -> List[np.ndarray]:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        fp = fingerprint(self._sources(), f"{self.name}-v1-{self.image_size}-{self.channels}")
        return self.cache_dir / f"{self.name}-{self.image_size}px-{fp}.pt"

    def _build(self) -> torch.Tensor:
        per_class = self._decode()
        if len(per_class) != len(self.class_names):
            raise MetalearnError(f"{self.name}: decoded {len(per_class)} classes, indexed {len(self.class_names)}")
        P = self.samples_per_class
        images = torch.empty(len(per_class), P, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        for i, arr in enumerate(per_class):
            if len(arr) < P:
                raise MetalearnError(f"{self.name}: class {self.class_names[i]!r} decoded {len(arr)} images, "
                                     f"expected >= {P}")
            images[i] = resize_uint8(to_nchw(arr[:P], self.channels, f"{self.name} class {self.class_names[i]!r}"),
                                     self.image_size)
        return images

    def standard_split(self) -> Dict[str, torch.Tensor]:
        raise MetalearnError(f"{self.name} has no standard split")


def read_cache(path: Path, class_names: Sequence[str]) -> "torch.Tensor | None":
    """The cached uint8 images at `path`, or None if missing, unreadable or for other classes."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
    except Exception:
        return None  # unreadable: the caller rebuilds it
    return blob["images"] if blob.get("class_names") == list(class_names) else None


def is_cache_file(path: Path, stale: str) -> bool:
    """Whether `path` is a decode cache that `write_cache` wrote: its name is `stale` with the `*` being a
    20-hex-digit fingerprint, and it is a torch file holding exactly {"class_names", "images"} (read
    lazily with mmap, so checking costs no decode). Anything else in the folder is not ours."""
    pattern = re.escape(stale).replace(r"\*", "[0-9a-f]{20}")
    if not re.fullmatch(pattern, path.name) or path.is_symlink() or not path.is_file():
        return False
    try:
        blob = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception:
        return False
    return (isinstance(blob, dict) and set(blob) == {"class_names", "images"}
            and isinstance(blob["images"], torch.Tensor))


def write_cache(path: Path, class_names: Sequence[str], images: torch.Tensor, stale: str) -> None:
    """Atomically write the cache, then delete older caches of the same data set (glob `stale`): only
    files `is_cache_file` recognises as caches this code wrote, never anything else in the folder."""
    try:
        atomic_torch_save({"class_names": list(class_names), "images": images}, path)
        for old in path.parent.glob(stale):
            if old != path and is_cache_file(old, stale):
                old.unlink(missing_ok=True)
    except (OSError, MetalearnError) as e:
        print(f"warning: could not write the cache {path}: {e}", file=sys.stderr)


def split_by_names(dataset_name: str, class_names: Sequence[str], members: Dict[str, Sequence[str]],
                   sources: "Dict[str, object] | None" = None,
                   counts: "Sequence[int] | None" = None) -> Dict[str, torch.Tensor]:
    """split name -> class names  =>  split name -> sorted int64 indices into class_names. Checks
    (metalearn/data/checks.py) that no class is listed twice, in two splits, missing from the data or
    (with `counts`, per class_names entry) without images; errors name `sources[split]`, the listing file."""
    from .checks import check_class_lists
    from .splits import check_disjoint

    where = {c: i for i, c in enumerate(class_names)}
    sources = sources or {split: f"the {split} split" for split in members}
    check_class_lists(dataset_name, members, sources, known=where,
                      counts=None if counts is None else dict(zip(class_names, counts)))
    out = {split: torch.tensor(sorted(where[n] for n in names), dtype=torch.int64) for split, names in members.items()}
    check_disjoint(out)
    return out


def load_pickle(path: Path, what: str):
    import pickle

    if not path.is_file():
        raise MetalearnError(f"{what}: {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(0)
        if head.lstrip()[:1] == b"<":
            raise MetalearnError(f"{what}: {path} is an HTML page, not a pickle (a failed download?)")
        try:
            return pickle.load(f, encoding="latin1")
        except Exception as e:
            raise MetalearnError(f"{what}: {path} is not a readable pickle ({type(e).__name__}: {e})") from None
