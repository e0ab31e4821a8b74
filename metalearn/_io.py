"""Atomic file writes: a temp file in the target folder, fsync, then rename.

A kill at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), mode="w")


def update_marked_block(path: str | Path, begin: str, end: str, body: str, *, check: bool = False) -> str:
    """Put `body` between the marker lines `begin` and `end` of a text file (a generated README table).

    Returns "missing" (no markers), "current" (already `body`), "stale" (check=True and it differs)
    or "updated" (rewritten atomically).
    """
    path = Path(path)
    text = path.read_text()
    if begin not in text or end not in text:
        return "missing"
    head, rest = text.split(begin, 1)
    new = head + begin + body + end + rest.split(end, 1)[1]
    if new == text:
        return "current"
    if check:
        return "stale"
    atomic_write(path, lambda f: f.write(new), mode="w")
    return "updated"
