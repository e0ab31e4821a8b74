"""The Omniglot loader on the real data in $METALEARN_DATA, and its cache on a small generated copy."""
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import Omniglot
from metalearn.errors import MetalearnError


def test_real_omniglot_decodes_to_uint8_tensor(omniglot):
    images = omniglot.images
    assert images.shape == (1623, 20, 1, 28, 28) and images.dtype == torch.uint8
    assert len(omniglot.class_names) == 1623 and len(set(omniglot.class_names)) == 1623
    assert sum(n.startswith("images_background/") for n in omniglot.class_names) == 964
    # strokes bright on a dark background, antialiased (grey levels between 0 and 255)
    assert images.float().mean() < 64
    assert ((images > 0) & (images < 255)).any()
    assert omniglot.cache_path.is_file()


def test_real_omniglot_cache_is_reused(omniglot, data_root, cache_dir):
    omniglot.images  # make sure the cache exists
    again = Omniglot(data_root / "omniglot", cache_dir=cache_dir)
    assert torch.equal(again.images, omniglot.images)
    assert again.cache_path == omniglot.cache_path


def _write_tiny(root, chars=3, drawings=20, value=0):
    for part in ("images_background", "images_evaluation"):
        for c in range(chars):
            d = root / part / "Alpha" / f"character{c + 1:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(drawings):
                arr = np.full((105, 105), 255, np.uint8)
                arr[10 + c: 40 + j, 20:30] = value
                Image.fromarray(arr).convert("1").save(d / f"{c:04d}_{j + 1:02d}.png")


def test_cache_rebuilt_when_source_changes(tmp_path):
    root, cache = tmp_path / "omniglot", tmp_path / "cache"
    _write_tiny(root)
    first = Omniglot(root, cache_dir=cache, expected_characters=6)
    a, first_path = first.images.clone(), first.cache_path
    assert a.shape == (6, 20, 1, 28, 28)
    png = root / "images_background" / "Alpha" / "character01" / "0000_01.png"
    Image.fromarray(np.zeros((105, 105), np.uint8)).convert("1").save(png)  # an all-black drawing
    second = Omniglot(root, cache_dir=cache, expected_characters=6)
    assert second.cache_path != first_path
    b = second.images
    assert not torch.equal(a[0, 0], b[0, 0]) and torch.equal(a[1:], b[1:])
    assert list(cache.glob("*.pt")) == [second.cache_path]  # the stale cache is gone


def test_zip_and_folder_layouts_agree(tmp_path):
    root = tmp_path / "folders"
    _write_tiny(root, chars=2)
    zipped = tmp_path / "zips"
    zipped.mkdir()
    for part in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(zipped / f"{part}.zip", "w") as zf:
            for f in sorted((root / part).rglob("*.png")):
                zf.write(f, f.relative_to(root).as_posix())
    a = Omniglot(root, cache_dir=tmp_path / "c1", expected_characters=4)
    b = Omniglot(zipped, cache_dir=tmp_path / "c2", expected_characters=4)
    assert a.class_names == b.class_names and torch.equal(a.images, b.images)


def test_missing_and_malformed_data_are_clear_errors(tmp_path):
    with pytest.raises(MetalearnError, match="does not exist"):
        Omniglot(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetalearnError, match="images_background"):
        Omniglot(tmp_path / "empty")
    _write_tiny(tmp_path / "short", drawings=19)
    with pytest.raises(MetalearnError, match="has 19 drawings, expected 20"):
        Omniglot(tmp_path / "short", expected_characters=None)
    _write_tiny(tmp_path / "few")
    with pytest.raises(MetalearnError, match="found 6 characters .* expected 1623"):
        Omniglot(tmp_path / "few")
    bad = tmp_path / "badzip"
    bad.mkdir()
    (bad / "images_background.zip").write_text("<html>not a zip</html>")
    (bad / "images_evaluation.zip").write_text("<html>not a zip</html>")
    with pytest.raises(MetalearnError, match="is an HTML page, not a zip file"):
        Omniglot(bad)
    (bad / "images_background.zip").write_bytes(b"PK\x03\x04 truncated garbage")
    with pytest.raises(MetalearnError, match="not a readable zip"):
        Omniglot(bad)
