"""benchmarks/profile_meta_step.py --timer dispatch: each operator timed alone, keyed by its input shapes and
layouts. The README's account of where row 1's time goes rests on these keys being the operators that ran."""
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import load_benchmark


@pytest.fixture(scope="module")
def profiler():
    return load_benchmark("profile_meta_step")


def test_the_dispatch_timer_keys_each_top_level_operator_by_shape_and_layout(profiler):
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 3, 3, 3, requires_grad=True)

    def step(_):
        F.conv2d(x, w, padding=1).relu().sum().backward()

    ops, wall = profiler.op_seconds_dispatch(step, None)
    names = {k.split(" ")[0] for k in ops}
    assert "aten.convolution.default" in names and "aten.convolution_backward.default" in names
    assert "aten.relu.default" in names
    # the operators a convolution calls inside are timed as part of it, not again on their own
    assert not any(n.startswith(("aten._convolution", "aten.mkldnn_convolution")) for n in names)
    assert "aten.convolution.default (2, 3, 8, 8)cl (4, 3, 3, 3)" in ops
    assert all(v >= 0 for v in ops.values()) and wall > 0
    assert x.grad is not None and w.grad is not None  # the step itself ran unchanged under the timer


def test_the_dispatch_timer_refuses_cuda(profiler, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_meta_step.py", "--timer", "dispatch", "--device", "cuda"])
    with pytest.raises(SystemExit) as e:
        profiler.main()
    assert e.value.code == 2
    assert "CPU operators only" in capsys.readouterr().err
