"""Opt-in reduced precision (metalearn/precision.py): settings, refusals, and a bounded effect on the
meta-gradient; fp32 stays the exact default."""
import pytest
import torch

from metalearn.algorithms import MAML
from metalearn.config import Config, validate
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.precision import meta_step_context, set_precision

from test_maml_gradients import LR, STEPS, make_batch, make_model


def meta_gradient(precision: "str | None", steps: int = STEPS) -> torch.Tensor:
    """The float32 meta-gradient under `precision`'s context (None: no context at all)."""
    model = make_model().float()
    batch = make_batch(dtype=torch.float32)
    algo = Engine(MAML(model, inner_lr=LR, inner_steps=steps))
    if precision is None:
        algo.meta_step(batch)
    else:
        with meta_step_context(precision, torch.device("cpu")):
            algo.meta_step(batch)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_bf16_changes_the_arithmetic_and_stays_close_without_inner_steps():
    g32, g16 = meta_gradient("fp32", steps=0), meta_gradient("bf16", steps=0)  # plain forward/backward
    assert not torch.equal(g16, g32)  # autocast did run the convolutions in bfloat16
    assert cosine(g16, g32) > 0.98
    # Through inner steps at lr 0.4 this small random model amplifies rounding ~1e4-fold (float32
    # itself moves its meta-gradient by ~1e-3 from float64's), so bfloat16's ~4e-3 per operation turns
    # the meta-gradient far away: the reason bf16 is opt-in (numbers: benchmarks/check_precision.py).
    assert torch.isfinite(meta_gradient("bf16")).all()


def test_fp32_context_changes_nothing():
    assert torch.equal(meta_gradient("fp32"), meta_gradient(None))


def test_precision_settings_are_checked():
    with pytest.raises(MetalearnError, match="precision=tf32 needs a CUDA device"):
        set_precision("tf32", torch.device("cpu"))
    with pytest.raises(MetalearnError, match="precision must be one of"):
        set_precision("fp16", torch.device("cpu"))
    set_precision("bf16", torch.device("cpu"))  # allowed on CPU
    cfg = Config()
    cfg.precision = "half"
    with pytest.raises(MetalearnError, match=r"precision: Invalid value 'half', expected one of \[fp32, tf32, bf16\]"):
        validate(cfg)
    cfg.precision, cfg.dtype = "bf16", "float64"
    with pytest.raises(MetalearnError, match="needs dtype=float32"):
        validate(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_turns_tf32_off_and_tf32_turns_it_on():
    set_precision("tf32", torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    set_precision("fp32", torch.device("cuda"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
