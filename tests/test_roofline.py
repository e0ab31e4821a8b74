"""benchmarks/roofline_meta_step.py counts the arithmetic of a meta-step; its bound is only as good as
that count. torch's flop counter counts a grouped convolution's weight gradient as if ungrouped,
which would make the batched paths (per-task weights as groups) look like more work than they are."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import load_benchmark


@pytest.fixture(scope="module")
def roofline():
    return load_benchmark("roofline_meta_step")


@pytest.mark.parametrize("groups", [1, 4])
def test_a_grouped_convolution_is_counted_as_its_multiplications(roofline, groups):
    n, c, size, k = 2, 8, 6, 3
    x = torch.randn(n, c, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, c // groups, k, k, dtype=torch.float64, requires_grad=True)
    forward = 2 * n * size * size * c * (c // groups) * k * k  # padding 1: the output is size x size
    total, conv = roofline.count_flops(lambda _: F.conv2d(x, w, padding=1, groups=groups).sum().backward(), None)
    assert conv == 3 * forward  # the forward, the input gradient and the weight gradient, each the same work
    x.requires_grad_(False)
    total, conv = roofline.count_flops(lambda _: F.conv2d(x, w, padding=1, groups=groups).sum().backward(), None)
    assert conv == 2 * forward


@pytest.mark.parametrize("steps", [1, 2])
def test_every_path_does_the_arithmetic_of_the_per_task_loop(roofline, steps):
    """What makes the roofline bound hold for all paths: batching tasks (shared-weight batches, grouped
    convolutions under vmap) does not change the floating-point work, so no path can beat learn2learn
    by more than the ceiling allows. With torch's own count the batched paths would differ."""
    bench = roofline.bench
    # 32 filters: conv4's first block takes the stem on hybrid's support passes (metalearn/models/stem.py)
    row = replace(bench.ROWS["omniglot-5w1s-1step"], tasks=3, hidden=32, steps=steps, query=2)
    batch = bench.make_batch(row, torch.device("cpu"), seed=0)
    counts = {}
    for path in ("loop", "batched", "hybrid", "hybrid-without-stem") + (
            ("learn2learn",) if bench.available("learn2learn", row) else ()):
        model = bench.make_model(row, torch.device("cpu"))
        if path == "hybrid-without-stem":
            load_benchmark("bench_stem").without_stem(model)
        fn = bench.meta_step_fn(path.replace("-without-stem", ""), row, model)
        counts[path] = roofline.count_flops(fn, batch)
    # the same convolutions everywhere; conv4's first block on hybrid (metalearn/models/stem.py) adds its
    # statistics' small matrix products (9 x 9 per task), and without it hybrid does exactly the loop's work
    stem = counts.pop("hybrid")
    assert counts["loop"][1] > 0 and len(set(counts.values())) == 1, counts
    assert stem[1] == counts["loop"][1] and stem[0] > counts["loop"][0], (stem, counts)
