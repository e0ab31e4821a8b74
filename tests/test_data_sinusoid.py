"""Sinusoid regression tasks (MAML / Reptile protocols): shapes, ranges, y = A sin(x - phi), determinism."""
import math

import pytest
import torch

from metalearn.data import SinusoidSampler, fixed_sinusoid_episodes
from metalearn.errors import MetalearnError


@pytest.mark.parametrize("protocol,phase_hi", [("maml", math.pi), ("reptile", 2 * math.pi)])
def test_shapes_ranges_and_function(protocol, phase_hi):
    s = SinusoidSampler(10, 7, protocol=protocol, seed=0)
    b = s.sample(2000)
    assert b.support.x.shape == (2000, 10, 1) and b.support.y.shape == (2000, 10, 1)
    assert b.query.x.shape == (2000, 7, 1) and b.query.y.shape == (2000, 7, 1)
    assert (b.ways, b.shots, b.query_shots) == (1, 10, 7) and b.support.x.dtype == torch.float32
    a, p = s.last_amplitude, s.last_phase
    assert a.shape == (2000,) and 0.1 <= a.min() and a.max() <= 5.0 and a.max() > 4.9 and a.min() < 0.2
    assert 0 <= p.min() and p.max() <= phase_hi and p.max() > 0.95 * phase_hi
    for side in (b.support, b.query):
        assert -5 <= side.x.min() and side.x.max() <= 5
        expected = a.view(-1, 1, 1) * torch.sin(side.x - p.view(-1, 1, 1))
        torch.testing.assert_close(side.y, expected)


def test_seeded_determinism_state_and_dtype():
    a = SinusoidSampler(5, 5, seed=3, dtype=torch.float64)
    b = SinusoidSampler(5, 5, seed=3, dtype=torch.float64)
    assert a.sample(4).support.x.dtype == torch.float64
    state = a.state_dict()
    x1 = a.sample(4).query.y
    b.sample(4)
    assert torch.equal(x1, b.sample(4).query.y)
    a.load_state_dict(state)
    assert torch.equal(x1, a.sample(4).query.y)
    assert not torch.equal(x1, SinusoidSampler(5, 5, seed=4, dtype=torch.float64).sample(4).query.y)


def test_fixed_episodes_independent_of_batch_size():
    one = torch.cat([b.support.y for b in fixed_sinusoid_episodes(5, 10, count=23, seed=1, batch_size=23)])
    many = torch.cat([b.support.y for b in fixed_sinusoid_episodes(5, 10, count=23, seed=1, batch_size=4)])
    assert one.shape == (23, 5, 1) and torch.equal(one, many)
    other = torch.cat([b.support.y for b in fixed_sinusoid_episodes(5, 10, count=23, seed=2, batch_size=4)])
    assert not torch.equal(one, other)
    b = next(fixed_sinusoid_episodes(5, 10, count=3, seed=1, protocol="reptile"))
    assert b.query.x.shape == (3, 10, 1) and b.ways == 1


def test_bad_arguments():
    with pytest.raises(MetalearnError, match="protocol"):
        SinusoidSampler(5, 5, protocol="nope", seed=0)
    with pytest.raises(MetalearnError, match="shots"):
        SinusoidSampler(0, 5, seed=0)
