"""The sampler's fast assembly (flat row gathers, gather-based rotation) equals its reference twin
(advanced indexing, per-class torch.rot90) exactly, with and without rotations, in float32 and float64."""
import pytest
import torch

from metalearn.data import EpisodeSampler
from metalearn.data.sampler import _assemble, _assemble_reference, _flatten


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_assembly_equals_reference(rotate, dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 9, 3, 6, 6), generator=g, dtype=torch.uint8)
    T, N, K, Q = 7, 5, 2, 3
    classes = torch.rand(T, 30, generator=g).topk(N, dim=-1).indices
    samples = torch.rand(T, N, 9, generator=g).argsort(-1)[..., : K + Q]
    turns = torch.randint(0, 4, (T, N), generator=g) if rotate else None
    fast = _assemble(_flatten(images), 9, classes, samples, N, K, Q, dtype, turns)
    ref = _assemble_reference(images, classes, samples, N, K, Q, dtype, turns)
    for a, b in ((fast.support, ref.support), (fast.query, ref.query)):
        assert a.x.dtype == dtype and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_sampler_classes_are_uniform_over_the_split():
    """Every class is drawn about equally often (top-N of iid uniforms), and every label slot too."""
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1, 1).expand(12, 4, 1, 1, 1).contiguous()
    batch = EpisodeSampler(images, 3, 1, 1, seed=0).sample(12000)
    drawn = (batch.support.x.view(12000, 3) * 255).round().long()
    assert all(len(set(row.tolist())) == 3 for row in drawn[:500])
    counts = torch.bincount(drawn.flatten(), minlength=12).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.05   # expected 3000 each; 5% is ~ 5 sigma
    first = torch.bincount(drawn[:, 0], minlength=12).float()
    assert (first / first.mean() - 1).abs().max() < 0.1


def test_the_leak_checker_can_fail():
    from test_data_helpers import assert_episodes_leak_free

    images = torch.randint(0, 256, (12, 4, 1, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    splits = {"train": torch.arange(0, 6), "test": torch.arange(6, 12)}
    assert_episodes_leak_free(images, splits, ways=3, tasks=20)  # clean
    leaky = images.clone()
    leaky[:6] = leaky[6:]  # every train image is also a test image
    with pytest.raises(AssertionError, match="another split"):
        assert_episodes_leak_free(leaky, splits, ways=3, tasks=20)
    with pytest.raises(AssertionError):
        assert_episodes_leak_free(images, {"train": torch.arange(0, 7), "test": torch.arange(6, 12)}, ways=3)
