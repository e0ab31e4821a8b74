"""The presets, ablations and sweeps shipped with the package (package data), found by name.

    metalearn train omniglot_5w1s_quick            # a name: metalearn/presets/configs/omniglot_5w1s_quick.yaml
    metalearn train path/to/my_preset.yaml         # a path still works, and wins over a name
    metalearn ablate first_order                   # metalearn/presets/ablations/first_order.yaml

In the repository, experiments/configs, experiments/ablations and experiments/sweeps are links to
these folders, so the paths in the README and in papers' scripts keep working.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from ..errors import MetalearnError

ROOT = Path(__file__).resolve().parent
KINDS = {"configs": "preset", "ablations": "ablation", "sweeps": "sweep"}
FILE_WORD = {"configs": "config file", "ablations": "ablation file", "sweeps": "sweep file"}


def folder(kind: str) -> Path:
    """The shipped folder of `kind` (configs, ablations or sweeps)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return ROOT / kind


def names(kind: str) -> List[str]:
    return sorted(p.stem for p in folder(kind).glob("*.yaml"))


def resolve(name_or_path: str | Path, kind: str = "configs") -> Path:
    """An existing file as given; else the shipped YAML of that name (with or without .yaml); else a
    one-line error listing what is shipped."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    what = KINDS[kind]
    if p.parent == Path(".") and p.suffix in ("", ".yaml"):
        shipped = folder(kind) / f"{p.stem}.yaml"
        if shipped.is_file():
            return shipped
        raise MetalearnError(f"{FILE_WORD[kind]} not found: {name_or_path} is neither a file nor a shipped {what}; "
                             f"shipped: {', '.join(names(kind))}")
    raise MetalearnError(f"{FILE_WORD[kind]} not found: {p}")


def description(path: Path) -> str:
    """The leading comment block of a YAML file, joined into one paragraph (its full description)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(x for x in lines if x)


__all__ = ["description", "folder", "names", "resolve"]
