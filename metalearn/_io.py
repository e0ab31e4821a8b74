"""Atomic file writes: a temp file in the target folder, fsync, then rename.

A kill at any moment leaves either the old file or the new one, never half of one. The file gets
the mode an ordinary `open()` would give it (0666 less the umask, e.g. 0644), not mkstemp's 0600.
A failed write (read-only folder, full disk) raises MetalearnError naming the path and the reason.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import MetalearnError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: os.umask can only be read by setting it


def os_error(e: BaseException) -> "OSError | None":
    """The OSError behind `e` (itself, or in its chain of causes: torch.save hides ENOSPC in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def describe_os_error(e: OSError, path: "str | Path | None" = None) -> str:
    """'cannot write PATH: No space left on device' (one line)."""
    where = e.filename if e.filename is not None else path
    reason = e.strerror or str(e) or type(e).__name__
    return f"cannot write {where}: {reason}" if where is not None else reason


def check_writable_folder(folder: "str | Path", what: str) -> None:
    """Raise MetalearnError unless `folder` is, or can be created as, a writable folder: every existing
    ancestor must be a folder (not a regular file) and the nearest existing one writable."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == folder:
            raise MetalearnError(f"{what}: {folder} is a file, not a folder")
        raise MetalearnError(f"{what}: cannot create the folder {folder}: {probe} is a file")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise MetalearnError(f"{what}: {probe} is not writable")


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MetalearnError(describe_os_error(e, path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        err = os_error(e) if isinstance(e, Exception) else None
        if err is not None:  # ENOSPC, EROFS, EACCES...: one line naming the path (the old file is intact)
            raise MetalearnError(describe_os_error(err, path).replace(str(tmp), str(path))) from None
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
