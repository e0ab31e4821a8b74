"""The download path against an HTTP server on 127.0.0.1 that the test starts and stops: pooch fetch,
md5 verification, HTML pages recognised, zip-slip refused, nothing half-written left behind."""
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("pooch")

from metalearn.data import Omniglot, download_cifar100, download_omniglot, fetch, safe_extract  # noqa: E402
from metalearn.errors import MetalearnError  # noqa: E402


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL) of a local HTTP server; stopped after the test."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def md5(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def omniglot_zip(path: Path, part: str, alphabets: int, chars: int) -> None:
    """A structurally valid mini Omniglot zip (alphabets x chars characters of 20 tiny PNGs)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4), 255).save(buf, format="PNG")
    with zipfile.ZipFile(path, "w") as zf:
        for a in range(alphabets):
            for c in range(chars):
                for d in range(20):
                    zf.writestr(f"{part}/Alpha{a}/character{c + 1:02d}/{a:02d}{c:02d}_{d + 1:02d}.png", buf.getvalue())


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_verifies_the_checksum(server, tmp_path):
    served, url = server
    (served / "data.bin").write_bytes(b"x" * 1000)
    dest = tmp_path / "dest"
    got = fetch(url + "data.bin", dest, "data.bin", md5(served / "data.bin"))
    assert got.read_bytes() == b"x" * 1000
    with pytest.raises(MetalearnError, match="checksum .* does not match"):
        fetch(url + "data.bin", dest, "other.bin", "md5:" + "0" * 32)
    assert leftovers(dest) == ["data.bin"]  # nothing half-written
    with pytest.raises(MetalearnError, match="download of .*missing.bin failed"):
        fetch(url + "missing.bin", dest, "missing.bin", None)
    assert leftovers(dest) == ["data.bin"]


def test_an_html_page_instead_of_the_data_is_recognised(server, tmp_path):
    served, url = server
    (served / "images_background.zip").write_text("<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>")
    with pytest.raises(MetalearnError, match="HTML page"):
        fetch(url + "images_background.zip", tmp_path / "d", "images_background.zip", None)
    assert leftovers(tmp_path / "d") == []
    # an HTML page saved by hand where a zip belongs: the loader names it
    root = tmp_path / "omni"
    root.mkdir()
    (root / "images_background.zip").write_bytes((served / "images_background.zip").read_bytes())
    omniglot_zip(root / "images_evaluation.zip", "images_evaluation", 1, 1)
    with pytest.raises(MetalearnError, match="images_background.zip is an HTML page"):
        Omniglot(root, cache_dir=tmp_path / "c", expected_characters=None)


def test_download_omniglot_end_to_end(server, tmp_path):
    served, url = server
    omniglot_zip(served / "images_background.zip", "images_background", 2, 482)  # 964 characters
    omniglot_zip(served / "images_evaluation.zip", "images_evaluation", 1, 659)
    files = {f: md5(served / f) for f in ("images_background.zip", "images_evaluation.zip")}
    root = download_omniglot(tmp_path / "omniglot", base_url=url, files=files)
    assert (root / "images_background.zip").read_bytes() == (served / "images_background.zip").read_bytes()
    ds = Omniglot(root, image_size=4, cache_dir=tmp_path / "cache")  # indexes (decoding is tested elsewhere)
    assert len(ds.class_names) == 1623 and ds.samples_per_class == 20
    # a wrong published checksum: refused, nothing saved
    bad = {"images_background.zip": "md5:" + "1" * 32}
    with pytest.raises(MetalearnError, match="does not match"):
        download_omniglot(tmp_path / "other", base_url=url, files=bad)
    assert leftovers(tmp_path / "other") == []
    # a user-supplied archive is not downloaded but checked by its structure
    user = tmp_path / "user"
    user.mkdir()
    omniglot_zip(user / "images_background.zip", "images_background", 1, 3)
    with pytest.raises(MetalearnError, match="holds 3 characters \\(expected 964\\)"):
        download_omniglot(user, base_url=url + "nothing-here/", files={"images_background.zip": None})


def test_published_omniglot_checksums_are_the_official_ones():
    from metalearn.data.download import OMNIGLOT_FILES

    assert OMNIGLOT_FILES == {"images_background.zip": "md5:68d2efa1b9178cc56df9314c21c6e718",
                              "images_evaluation.zip": "md5:6b91aef0f799c5bb55b94e3f2daec811"}


def test_zip_slip_is_refused(tmp_path):
    for name in ("../evil.txt", "/tmp/evil-abs.txt", "ok/../../evil.txt"):
        archive = tmp_path / "slip.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("good/file.txt", "fine")
            zf.writestr(name, "owned")
        with pytest.raises(MetalearnError, match="outside"):
            safe_extract(archive, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["slip.zip"]  # no temporary folder left
        archive.unlink()


def test_tar_slip_and_links_are_refused(tmp_path):
    def make(name, kind=tarfile.REGTYPE, linkname=""):
        archive = tmp_path / "a.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, linkname
            data = b"owned"
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return archive

    with pytest.raises(MetalearnError, match="outside"):
        safe_extract(make("../evil.txt"), tmp_path / "out")
    with pytest.raises(MetalearnError, match="link"):
        safe_extract(make("inside/link", tarfile.SYMTYPE, "/etc/passwd"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
    good = make("inside/file.txt")
    assert (safe_extract(good, tmp_path / "out") / "inside" / "file.txt").read_bytes() == b"owned"
    bad = tmp_path / "corrupt.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(MetalearnError, match="neither a zip nor a tar|corrupt"):
        safe_extract(bad, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_download_cifar100_extracts_safely(server, tmp_path):
    served, url = server
    archive = served / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for f in ("train", "test", "meta"):
            info = tarfile.TarInfo(f"cifar-100-python/{f}")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    folder = download_cifar100(tmp_path / "cifar", base_url=url, files={archive.name: md5(archive)})
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    assert sorted(leftovers(tmp_path / "cifar")) == ["cifar-100-python", "cifar-100-python.tar.gz"]
