import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package; its scripts import each other by name)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def data_root() -> Path:
    """$METALEARN_DATA (the folder holding omniglot/); tests needing real data skip without it."""
    env = os.environ.get("METALEARN_DATA")
    if not env:
        pytest.skip("real data not available: set METALEARN_DATA to the folder holding omniglot/")
    assert (Path(env) / "omniglot").is_dir(), f"METALEARN_DATA={env} holds no omniglot/ folder"
    return Path(env)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decode cache for the whole session ($METALEARN_CACHE if set, so repeated runs reuse it)."""
    env = os.environ.get("METALEARN_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def omniglot(data_root, cache_dir):
    from metalearn.data import Omniglot

    return Omniglot(data_root / "omniglot", cache_dir=cache_dir)


def id_images(num_classes: int, per_class: int) -> torch.Tensor:
    """uint8 (classes, per_class, 1, 2, 2) whose pixels encode (class, sample): see decode_ids."""
    c = torch.arange(num_classes).view(-1, 1).expand(num_classes, per_class)
    s = torch.arange(per_class).view(1, -1).expand(num_classes, per_class)
    img = torch.stack([c % 256, c // 256, s, torch.zeros_like(c)], -1).view(num_classes, per_class, 1, 2, 2)
    return img.to(torch.uint8)


def decode_ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of id_images after the sampler's /255: (..., 1, 2, 2) floats -> class ids, sample ids."""
    px = (x * 255).round().long().flatten(-3)
    return px[..., 0] + 256 * px[..., 1], px[..., 2]


def baseline(name: str):
    """Import learn2learn / higher; skip without them unless METALEARN_REQUIRE_BASELINES=1 (make test)."""
    import importlib

    if os.environ.get("METALEARN_REQUIRE_BASELINES") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): on a loaded 2-core machine a second thread made small
    meta-steps up to 10x slower (the README example's two meta-steps: 42 s against 1.4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
