"""BatchNormFirstOrder (metalearn/models/batchnorm.py), the fused first-order BatchNorm of hybrid's query passes,
against its reference `batch_norm_from_sums` differentiated by autograd: the same forward to the bit, the same
gradients in float64 and as accurate in float32 on real Omniglot activations; a second differentiation refused;
and hybrid's meta-step really runs it (so the float64 hybrid-vs-loop tests of test_batched.py cover it)."""
import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import MAML
from metalearn.engine import Engine
from metalearn.inner.layout import channels_last
from metalearn.models import Conv4
from metalearn.models.batchnorm import (BatchNormFirstOrder, batch_norm_from_sums, channels_last_batch_norm,
                                       first_order_norms)
from metalearn.types import Examples, TaskBatch


def _activations(dtype: torch.dtype, images: torch.Tensor = None) -> "tuple[torch.Tensor, ...]":
    """Channels-last conv activations (B, 16, H, W), an upstream gradient and affine parameters."""
    g = torch.Generator().manual_seed(0)
    if images is None:
        images = torch.rand(12, 1, 20, 20, generator=g, dtype=torch.float64)
    w = torch.randn(16, images.shape[1], 3, 3, generator=g, dtype=torch.float64)
    h = F.conv2d(channels_last(images.double()), w, padding=1) * 3 + 1
    assert not h.is_contiguous()  # channels-last: the layout the fused path serves
    up = torch.randn(h.shape, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(16, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (h, up, weight, bias))


def _grads(fn, h, up, weight, bias):
    h, weight, bias = (t.detach().clone().requires_grad_() for t in (h, weight, bias))
    out = fn(h, weight, bias)
    return (out.detach(), *torch.autograd.grad(out, (h, weight, bias), up))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fused_equals_the_reference_in_float64():
    h, up, weight, bias = _activations(torch.float64)
    fused = _grads(lambda *a: BatchNormFirstOrder.apply(*a, 1e-5), h, up, weight, bias)
    ref = _grads(lambda *a: batch_norm_from_sums(*a, 1e-5), h, up, weight, bias)
    assert torch.equal(fused[0], ref[0])  # the same forward operations
    for got, want in zip(fused[1:], ref[1:]):
        assert _rel(got, want) < 1e-12
    assert all(r.abs().sum() > 0 for r in ref[1:])  # not vacuous: the gradients are not zero


def test_fused_is_as_accurate_as_the_reference_in_float32_on_real_images(omniglot):
    images = omniglot.images[:12, 0].float() / 255  # 12 real characters, (12, 1, 105, 105)
    images = F.interpolate(images, size=28, mode="area")
    exact = _grads(lambda *a: batch_norm_from_sums(*a, 1e-5), *_activations(torch.float64, images))
    args32 = _activations(torch.float32, images)
    fused = _grads(lambda *a: BatchNormFirstOrder.apply(*a, 1e-5), *args32)
    ref = _grads(lambda *a: batch_norm_from_sums(*a, 1e-5), *args32)
    for got, want, truth in zip(fused, ref, exact):
        assert _rel(want, truth) > 0  # float32 differs from float64: the comparison is not vacuous
        assert _rel(got, truth) <= max(10 * _rel(want, truth), 1e-6)


def test_a_second_differentiation_is_refused():
    h, up, weight, bias = (t.requires_grad_() for t in _activations(torch.float64))
    with first_order_norms():
        out = channels_last_batch_norm(h, weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(out, h, up, create_graph=True)


def test_outside_the_context_the_reference_runs():
    h, up, weight, bias = (t.requires_grad_() for t in _activations(torch.float64))
    out = channels_last_batch_norm(h, weight, bias, 1e-5)
    assert "BatchNormFirstOrder" not in type(out.grad_fn).__name__


def test_hybrid_query_passes_run_the_fused_backward(monkeypatch):
    calls = []
    apply = BatchNormFirstOrder.apply
    monkeypatch.setattr(BatchNormFirstOrder, "apply", lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    model = Conv4(hidden=8).double()
    x = torch.rand(3, 10, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(5).repeat(2).expand(3, 10)
    batch = TaskBatch(Examples(x[:, :5], y[:, :5]), Examples(x[:, 5:], y[:, 5:]), 5, 1, 1)
    Engine(MAML(model, inner_lr=0.1, inner_steps=1), "hybrid").meta_step(batch)
    # every task's query pass, each of conv4's four BatchNorm layers (at 8 filters the first block does not run
    # from patch statistics, metalearn/models/stem.py `stem_pays`)
    assert len(calls) == 3 * 4


def test_mixed_precision_takes_the_torch_ops_backward():
    """bfloat16 activations with float32 parameters (autocast on a CPU): PyTorch's BatchNorm backward kernel
    refuses the mix, so BatchNormFirstOrder computes the same formula in torch ops; it stays close to the float64
    reference (bfloat16 keeps 8 bits of mantissa) and returns gradients in each input's dtype."""
    h, up, weight, bias = _activations(torch.float64)
    ref = _grads(lambda *a: batch_norm_from_sums(*a, 1e-5), h, up, weight, bias)
    hb, upb = h.bfloat16(), up.bfloat16()
    hb_, w_, b_ = (t.detach().clone().requires_grad_() for t in (hb, weight.float(), bias.float()))
    out = BatchNormFirstOrder.apply(hb_, w_, b_, 1e-5)
    got = torch.autograd.grad(out, (hb_, w_, b_), upb)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32, torch.float32]
    for g, want in zip(got, ref[1:]):
        assert _rel(g, want) < 5e-2
