"""conv4's first block from patch statistics (metalearn/models/stem.py) against its plain operations.

The reference is written here from PyTorch's own kernels: conv2d, F.batch_norm in training mode (batch statistics,
no running statistics), max_pool2d, relu, which is what `ConvBlock` computes on NCHW images (the per-task loop).
float64: values, first and second derivatives to 1e-10 (relative L2 over all inputs). float32 on real Omniglot
images: no further from float64 than the plain block.
"""
import pytest
import torch
import torch.nn.functional as F

from metalearn.inner.layout import channels_last
from metalearn.models import Conv4
from metalearn.models.stem import conv_norm_pool

EPS = 1e-5


def plain(x, w, b, gamma, beta):
    h = F.batch_norm(F.conv2d(x, w, b, padding=1), None, None, gamma, beta, True, 0.0, EPS)
    return F.max_pool2d(h, 2).relu()


def stem(x, w, b, gamma, beta):
    return conv_norm_pool(x, w, b, gamma, beta, EPS)


def params(channels: int, width: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(width, channels, 3, 3, generator=g, dtype=dtype) / 3
    b = torch.randn(width, generator=g, dtype=dtype) * 0.1
    gamma = torch.randn(width, generator=g, dtype=dtype)  # both signs: the minimum-pooling branch runs
    beta = torch.randn(width, generator=g, dtype=dtype) * 0.1
    assert (gamma < 0).any() and (gamma > 0).any()
    return [t.requires_grad_() for t in (w, b, gamma, beta)]


def rel(got, ref) -> float:
    num = sum(((g - r) ** 2).sum() for g, r in zip(got, ref)).sqrt()
    den = sum((r ** 2).sum() for r in ref).sqrt()
    assert den > 0, "the reference is zero: the comparison is vacuous"
    return (num / den).item()


@pytest.mark.parametrize("channels,size,binary", [(1, 28, True), (1, 28, False), (3, 12, False), (1, 9, False)])
def test_float64_values_and_derivatives_match_the_plain_block(channels, size, binary):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, channels, size, size, generator=g, dtype=torch.float64)
    x = (x > 0.7).double() if binary else x
    x = channels_last(x).requires_grad_()
    ps = params(channels, 8, torch.float64)
    upstream = torch.randn(6, 8, size // 2, size // 2, generator=g, dtype=torch.float64)
    outs, firsts, seconds = [], [], []
    for f in (plain, stem):
        y = f(x, *ps)
        grads = torch.autograd.grad((y * upstream).sum(), [x, *ps], create_graph=True)
        # a second derivative: the gradient of a scalar function of the first derivatives (MAML's shape)
        seconds.append(torch.autograd.grad(sum((d ** 2).sum() for d in grads), [x, *ps]))
        outs.append(y)
        firsts.append(grads)
    assert rel([outs[1]], [outs[0]]) <= 1e-12
    assert rel(firsts[1], firsts[0]) <= 1e-10
    assert rel(seconds[1], seconds[0]) <= 1e-10


def test_float32_on_real_omniglot_is_no_further_from_float64_than_the_plain_block(omniglot):
    """The plain block runs on NCHW images, as the loop does (PyTorch's NCHW BatchNorm kernel is the accurate one;
    its channels-last CPU kernel accumulates in float32, issue #19), the stem on channels-last ones."""
    x64 = omniglot.images[:75, 0].double() / 255
    assert 0 < x64.mean() < 1 and (x64 > 0).any()
    for seed in range(3):
        ps64 = params(1, 64, torch.float64, seed)
        up = torch.randn(75, 64, 14, 14, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

        def run(f, x):
            ps = [p.detach().to(x.dtype).requires_grad_() for p in ps64]
            y = f(x, *ps)
            return [y.double()], [d.double() for d in torch.autograd.grad(y, ps, up.to(x.dtype))]

        ref_y, ref_g = run(plain, x64)
        plain_y, plain_g = run(plain, x64.float())
        stem_y, stem_g = run(stem, channels_last(x64.float()))
        assert rel(plain_g, ref_g) > 0, "float32 and float64 agree exactly: the comparison is vacuous"
        assert rel(stem_g, ref_g) <= max(rel(plain_g, ref_g), 1e-6)  # measured: 2-3e-6 against 0.9-2.1e-4
        assert rel(stem_y, ref_y) <= max(10 * rel(plain_y, ref_y), 1e-6)


def test_conv_block_takes_the_stem_only_for_channels_last_images_where_it_pays(monkeypatch):
    import metalearn.models.conv4 as conv4

    calls = []
    monkeypatch.setattr(conv4, "conv_norm_pool", lambda *a: calls.append(a) or stem(*a[:5]))
    torch.manual_seed(0)
    model = Conv4(hidden=32).double()
    x = torch.rand(75, 1, 28, 28, dtype=torch.float64)  # 75 x 28 x 28 x 32 = 1.9M activation elements
    nchw = model(x)
    assert not calls  # NCHW images (the per-task loop, the reference path) run the plain operations
    cl = model(channels_last(x))
    assert len(calls) == 1  # the first block only: the others have 32 input channels
    assert (cl - nchw).abs().max() <= 1e-12 * nchw.abs().max()
    model(channels_last(x[:5]))
    assert len(calls) == 1  # 5 images: too small an activation to pay
    Conv4(hidden=16).double()(channels_last(x))
    assert len(calls) == 1  # 16 filters: the 9x9 statistics cost more than the passes they save
    Conv4(hidden=32, batchnorm=False).double()(channels_last(x))
    assert len(calls) == 1  # no BatchNorm, no stem


def test_where_the_stem_pays():
    """The rule bench_stem.py's grid measured: K = 9 * in_channels <= width / 3, and a large activation."""
    from metalearn.models.stem import STEM_MIN_ELEMENTS, stem_pays

    assert stem_pays(1, 64, 75 * 28 * 28 * 64) and stem_pays(1, 32, 75 * 28 * 28 * 32)
    assert not stem_pays(1, 16, 75 * 28 * 28 * 16)  # 9 > 16 / 3
    assert not stem_pays(3, 32, 75 * 84 * 84 * 32)  # mini-ImageNet's conv4: 27 > 32 / 3
    assert not stem_pays(1, 64, STEM_MIN_ELEMENTS - 1) and stem_pays(1, 64, STEM_MIN_ELEMENTS)
    assert stem_pays(1, 32, None) and not stem_pays(3, 32, None)  # under vmap: the channels decide


def test_hybrid_runs_the_stem_and_matches_the_loop_in_float64(monkeypatch):
    """hybrid's support passes (vmap over tasks) and query passes (channels-last images) take the stem, the loop's
    NCHW passes do not, and their float64 meta-gradients agree, second order through two inner steps
    (tests/test_batched.py checks hybrid against the independent reference, for every algorithm)."""
    import metalearn.models.conv4 as conv4
    from metalearn.algorithms import MAML
    from metalearn.engine import Engine
    from metalearn.types import Examples, TaskBatch

    import metalearn.models.stem as stem_module

    calls = []
    monkeypatch.setattr(conv4, "conv_norm_pool", lambda *a: calls.append(1) or conv_norm_pool(*a))
    monkeypatch.setattr(stem_module, "STEM_MIN_ELEMENTS", 0)  # small query sets take it too, to test both passes
    x = torch.rand(3, 10, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(5).repeat(2).expand(3, 10)
    batch = TaskBatch(Examples(x[:, :5], y[:, :5]), Examples(x[:, 5:], y[:, 5:]), 5, 1, 1)
    grads = {}
    for mode in ("loop", "hybrid"):
        torch.manual_seed(0)
        model = Conv4(hidden=32).double()
        Engine(MAML(model, inner_lr=0.1, inner_steps=2), mode).meta_step(batch)
        grads[mode] = [p.grad for n, p in model.named_parameters() if not n.endswith("conv.bias")]
        # hybrid: one vmap support pass per inner step (the 3 tasks in one chunk), one query pass per task
        assert len(calls) == (0 if mode == "loop" else 2 + 3)
    assert rel(grads["hybrid"], grads["loop"]) <= 1e-10


def test_the_benchmark_compares_the_same_function(omniglot):
    """benchmarks/bench_stem.py times the stem against the plain block it replaced on hybrid's query passes:
    the two must agree in float64 on its real batch, or its times compare different things."""
    from conftest import load_benchmark

    out = load_benchmark("bench_stem").block_times(reps=1, hidden=8)
    assert out["images"] == [75, 1, 28, 28]
    assert 0 < out["float64_gradient_rel_l2_stem_vs_plain"] <= 1e-10
    assert out["plain_ms_median"] > 0 and out["stem_ms_median"] > 0
