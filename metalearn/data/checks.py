"""Split checks: split files are checked, not trusted.

Every split source (mini-ImageNet's CSVs and pickles, tiered-ImageNet's label pickles, the CIFAR-FS
and FC100 class lists, the `folder` data set's JSON split file, Omniglot's two archives and its
alphabet lists) is checked when the data set is opened, before anything is decoded or written. A
class listed twice in one source, a class or a source file (image) in two splits, a class the data
does not have, or a class with no images is a one-line MetalearnError naming the file and the first
offending class or image (`check_class_lists`, plus each data set's own line-level checks).

Pixel-identical images in two splits can only be seen after decoding: a content hash of every
decoded image (blake2b of its cached uint8 pixels) is computed once and kept beside the decode
cache (`<cache>.hashes`), and the images of one split identical to an image of another are counted
and reported as one warning, not an error, since real data sets hold a few duplicates.
`split_report` gathers the per-split counts that `metalearn data check` prints.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import MetalearnError

DIGEST = 16  # bytes of blake2b per image


def check_class_lists(dataset: str, lists: Mapping[str, Sequence[str]], sources: Mapping[str, object],
                      known: Optional[Collection[str]] = None, counts: Optional[Mapping[str, int]] = None) -> None:
    """Refuse class lists that would leak a class across splits or silently drop one.

    lists: split -> class names in listed order; sources: split -> the file (or list) naming them.
    Raises on the first class listed twice in one source, in two splits, not in `known` (the data's
    classes) or with no images in `counts`, naming the source and the class.
    """
    where: Dict[str, str] = {}
    for split, names in lists.items():
        src = sources[split]
        listed = set()
        for name in names:
            if name in listed:
                raise MetalearnError(f"{dataset}: {src} lists class {name!r} twice")
            listed.add(name)
            if name in where:
                first = where[name]
                if str(sources[first]) == str(src):
                    raise MetalearnError(f"{dataset}: {src}: class {name!r} is in both the {first} "
                                         f"and the {split} split")
                raise MetalearnError(f"{dataset}: class {name!r} is in both the {first} split ({sources[first]}) "
                                     f"and the {split} split ({src})")
            where[name] = split
            if known is not None and name not in known:
                raise MetalearnError(f"{dataset}: {src} lists class {name!r}, which is not in the data")
            if counts is not None and counts.get(name, 0) == 0:
                raise MetalearnError(f"{dataset}: class {name!r} ({src}) has no images")


# --- pixel-identical images across splits -------------------------------------------------------
def image_hashes(images: torch.Tensor) -> torch.Tensor:
    """uint8 (classes, per_class, C, H, W) -> uint8 (classes, per_class, 16): blake2b of each image's pixels."""
    flat = images.reshape(images.shape[0] * images.shape[1], -1).contiguous().numpy()
    out = torch.empty(len(flat), DIGEST, dtype=torch.uint8)
    for i, row in enumerate(flat):
        out[i] = torch.frombuffer(bytearray(hashlib.blake2b(row.tobytes(), digest_size=DIGEST).digest()),
                                  dtype=torch.uint8)
    return out.view(images.shape[0], images.shape[1], DIGEST)


def cached_hashes(images: torch.Tensor, cache_path: "Path | None") -> torch.Tensor:
    """`image_hashes(images)`, read from `<cache_path stem>.hashes` when present for these images, else
    computed and written there (atomically; older hash files whose cache is gone are removed)."""
    shape = tuple(images.shape[:2]) + (DIGEST,)
    side = cache_path.with_suffix(".hashes") if cache_path is not None else None
    if side is not None and side.is_file():
        try:
            h = torch.load(side, weights_only=True)["hashes"]
            if isinstance(h, torch.Tensor) and tuple(h.shape) == shape and h.dtype == torch.uint8:
                return h
        except Exception:
            pass  # unreadable: recompute
    h = image_hashes(images)
    if side is not None:
        from .._io import atomic_torch_save

        try:
            atomic_torch_save({"hashes": h}, side)
            stem = re.sub(r"[0-9a-f]{20}$", "", cache_path.stem)
            for old in side.parent.glob(f"{stem}*.hashes"):
                if (old != side and re.fullmatch(re.escape(stem) + r"[0-9a-f]{20}\.hashes", old.name)
                        and not old.with_suffix(".pt").exists()):
                    old.unlink(missing_ok=True)
        except (OSError, MetalearnError):
            pass  # a read-only cache folder: hashed again next time
    return h


def identical_across_splits(hashes: torch.Tensor, splits: Mapping[str, torch.Tensor]
                            ) -> "Tuple[Dict[str, int], Optional[Tuple[Tuple[str, int, int], Tuple[str, int, int]]]]":
    """(split -> how many of its images are pixel-identical to an image of another split, the first such
    pair as ((split, class, image), (split, class, image)) or None). hashes: (classes, per_class, 16)."""
    first: Dict[bytes, Dict[str, Tuple[int, int]]] = {}
    per_image: List[Tuple[str, bytes]] = []
    for split, idx in splits.items():
        for c in idx.tolist():
            for i, row in enumerate(hashes[c].numpy()):
                key = row.tobytes()
                first.setdefault(key, {}).setdefault(split, (c, i))
                per_image.append((split, key))
    counts = {split: 0 for split in splits}
    example = None
    for split, key in per_image:
        owners = first[key]
        if len(owners) > 1:
            counts[split] += 1
            if example is None:
                (s1, (c1, i1)), (s2, (c2, i2)) = list(owners.items())[:2]
                example = ((s1, c1, i1), (s2, c2, i2))
    return counts, example


def _describe(ds, image: Tuple[str, int, int]) -> str:
    split, c, i = image
    return f"{ds.class_names[c]!r} image {i} ({split})"


def warn_identical_images(ds, splits: Mapping[str, torch.Tensor], cache_path: "Path | None") -> Dict[str, int]:
    """Warn (one line) when images of one split are pixel-identical to images of another; returns the counts."""
    counts, example = identical_across_splits(cached_hashes(ds.images, cache_path), splits)
    if example is not None:
        per = ", ".join(f"{s} {n}" for s, n in counts.items() if n)
        warnings.warn(f"{ds.name}: images pixel-identical to an image of another split: {sum(counts.values())} "
                      f"({per}), e.g. {_describe(ds, example[0])} and {_describe(ds, example[1])}; "
                      f"`metalearn data check {ds.name}` counts them per split", stacklevel=3)
    return counts


# --- metalearn data check -----------------------------------------------------------------------
def split_report(ds, splits: Mapping[str, torch.Tensor], *, pixels: bool = True,
                 cache_path: "Path | None" = None) -> dict:
    """Per split: classes, images (as listed, before truncation), classes and source files shared with
    another split (0: opening the data set refuses any), and images pixel-identical to one of another
    split (None when pixels=False: nothing decoded)."""
    counts = list(getattr(ds, "class_counts", [ds.samples_per_class] * len(ds.class_names)))
    identical, example = ({s: None for s in splits}, None)
    if pixels:
        identical, example = identical_across_splits(cached_hashes(ds.images, cache_path), splits)
    rows = [{"split": s, "classes": len(idx), "images": sum(counts[c] for c in idx.tolist()),
             "shared_classes": 0, "shared_files": 0, "identical_images": identical[s]} for s, idx in splits.items()]
    return {"dataset": ds.name, "samples_per_class": ds.samples_per_class, "rows": rows,
            "example": None if example is None else [_describe(ds, e) for e in example]}


def format_report(report: dict) -> str:
    """The table `metalearn data check` prints, then one verdict line."""
    head = ("split", "classes", "images", "shared classes", "shared files", "identical images")
    cells = [[r["split"], f"{r['classes']:,}", f"{r['images']:,}", str(r["shared_classes"]), str(r["shared_files"]),
              "-" if r["identical_images"] is None else f"{r['identical_images']:,}"] for r in report["rows"]]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    lines = ["  ".join(x.ljust(w) if j == 0 else x.rjust(w) for j, (x, w) in enumerate(zip(row, widths)))
             for row in [head, *cells]]
    same = sum(r["identical_images"] or 0 for r in report["rows"])
    verdict = "ok: no class or source file in more than one split"
    if any(r["identical_images"] is None for r in report["rows"]):
        verdict += "; pixel-identical images not checked (--no-pixels)"
    elif same:
        verdict += f"; warning: pixel-identical images across splits: {same}, e.g. {' and '.join(report['example'])}"
    else:
        verdict += "; no pixel-identical images across splits"
    return "\n".join(lines + [verdict])
