"""Downloads for users with internet: pooch fetches, checksums verify, extraction is safe.

  * `fetch(url, folder, fname, known_hash)` downloads with pooch into a temporary name, recognises
    an HTML page saved in place of the data (a login wall, a quota page, a 404 page), verifies the
    published checksum with pooch's hashing, and only then renames the file into place: a failed
    or interrupted download leaves nothing behind.
  * `safe_extract(archive, target)` unpacks a zip or tar archive, refusing members that would land
    outside `target` (absolute paths, `..`, links: "zip-slip"); it extracts into a temporary
    sibling folder and renames it into place, so a refused archive leaves no half-extracted folder.
  * `download_omniglot(root)` and `download_cifar100(root)` fetch the official archives with their
    published md5 checksums. An archive the user already put there is not re-downloaded: it is
    verified by its structure instead (Omniglot: 964 + 659 characters of 20 drawings).
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, Optional

from ..errors import MetalearnError
from .base import looks_like_html
from .omniglot import verify_zip

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
OMNIGLOT_FILES = {"images_background.zip": "md5:68d2efa1b9178cc56df9314c21c6e718",
                  "images_evaluation.zip": "md5:6b91aef0f799c5bb55b94e3f2daec811"}
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR100_FILES = {"cifar-100-python.tar.gz": "md5:eb9058c3a382ffc7106e4002c42a8d85"}


def fetch(url: str, folder: str | Path, fname: str, known_hash: Optional[str]) -> Path:
    """Download `url` to folder/fname, verified against known_hash ("md5:..." / "sha256:...")."""
    import pooch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / fname
    tmp_name = f".{fname}.{os.getpid()}.part"
    tmp = folder / tmp_name
    pooch.get_logger().setLevel("WARNING")
    try:
        pooch.retrieve(url, known_hash=None, fname=tmp_name, path=folder, progressbar=False)
    except Exception as e:  # requests' HTTPError / ConnectionError, OSError, ...
        tmp.unlink(missing_ok=True)
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise MetalearnError(f"download of {url} failed: {type(e).__name__}: {first_line}") from None
    try:
        if looks_like_html(tmp):
            raise MetalearnError(f"download of {url} returned an HTML page, not {fname} "
                                 f"(a login, quota or error page?); nothing was saved")
        if known_hash:
            alg, _, want = known_hash.partition(":")
            got = pooch.file_hash(str(tmp), alg=alg)
            if got.lower() != want.lower():
                raise MetalearnError(f"{fname} from {url}: {alg} checksum {got} does not match the published {want}; "
                                     f"nothing was saved")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _check_member(name: str, target: Path, archive: Path) -> Path:
    p = PurePosixPath(name.replace("\\", "/"))
    dest = (target / p).resolve()
    if p.is_absolute() or ".." in p.parts or not dest.is_relative_to(target.resolve()):
        raise MetalearnError(f"{archive}: member {name!r} would be extracted outside {target}; refusing the archive")
    return dest


def safe_extract(archive: str | Path, target: str | Path) -> Path:
    """Extract a .zip / .tar(.gz|.bz2|.xz) archive into `target` (created; must not exist yet)."""
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise MetalearnError(f"{archive} does not exist")
    if looks_like_html(archive):
        raise MetalearnError(f"{archive} is an HTML page, not an archive (a failed download?)")
    if target.exists():
        raise MetalearnError(f"{target} already exists; remove it or extract elsewhere")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, tmp, archive)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise MetalearnError(f"{archive}: member {info.filename!r} is a symbolic link; "
                                             f"refusing the archive")
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member(m.name, tmp, archive)
                    if not (m.isfile() or m.isdir()):
                        raise MetalearnError(f"{archive}: member {m.name!r} is a link or device; refusing the archive")
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the stdlib's own safety net too
                    tf.extractall(tmp, members=members, filter="data")
                else:
                    tf.extractall(tmp, members=members)
        else:
            raise MetalearnError(f"{archive} is neither a zip nor a tar archive (corrupt or truncated?)")
        os.replace(tmp, target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise MetalearnError(f"{archive} is corrupt: {e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_omniglot(root: str | Path, base_url: str = OMNIGLOT_URL,
                      files: Optional[Dict[str, str]] = None, verify_structure: bool = True) -> Path:
    """Fetch the two official Omniglot zips into root (md5-verified); keep user-supplied ones
    after checking their structure. Returns root, ready for `Omniglot(root)`."""
    root = Path(root)
    for fname, known_hash in (files or OMNIGLOT_FILES).items():
        path = root / fname
        if not path.is_file():
            fetch(base_url.rstrip("/") + "/" + fname, root, fname, known_hash)
        if verify_structure:
            verify_zip(path, fname[: -len(".zip")])
    return root


def download_cifar100(root: str | Path, base_url: str = CIFAR100_URL, files: Optional[Dict[str, str]] = None) -> Path:
    """Fetch and safely extract the CIFAR-100 python archive: root/cifar-100-python/{train,test,meta}."""
    root = Path(root)
    target = root / "cifar-100-python"
    if target.is_dir():
        return target
    (fname, known_hash), = (files or CIFAR100_FILES).items()
    archive = root / fname
    if not archive.is_file():
        fetch(base_url.rstrip("/") + "/" + fname, root, fname, known_hash)
    staging = root / ".cifar-100-extract"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        safe_extract(archive, staging)
        inner = staging / "cifar-100-python"
        if not all((inner / f).is_file() for f in ("train", "test", "meta")):
            raise MetalearnError(f"{archive} does not hold cifar-100-python/train, test and meta")
        os.replace(inner, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
