"""float32 meta-gradients of every execution path on real Omniglot batches, against float64.

Noise batches hide the error this guards against: PyTorch's channels-last BatchNorm kernel on CPU
accumulates its statistics in float32, which put the hybrid path (channels-last query images) 5e-3
away from float64 on the first real batch of the quick preset, while the loop was 1.4e-6 (issue
#19). Error = relative L2 over all parameters except the conv biases (right before BatchNorm their
true gradient is zero, so their float32 values are pure rounding noise). Each path must stay
within 10x of the loop's own float32 error (and under an absolute 1e-4), on three batches.
"""
import pytest
import torch

from metalearn.algorithms import ALGORITHMS
from metalearn.data import EpisodeSampler
from metalearn.engine import Engine
from metalearn.models.conv4 import Conv4

PATHS = ["loop", "batched", "hybrid"]


def relative_error(got: dict, ref: dict) -> float:
    keys = [n for n in ref if not n.endswith("conv.bias")]
    num = sum(((got[n] - ref[n]) ** 2).sum() for n in keys).sqrt()
    return (num / sum((ref[n] ** 2).sum() for n in keys).sqrt()).item()


def meta_gradient(algorithm: str, images: torch.Tensor, mode: str, dtype: torch.dtype, seed: int) -> dict:
    """One meta-gradient of the quick preset's setting (conv4 with 32 filters, 5-way 1-shot, 5 query
    examples per class, one inner step of 0.4), 4 tasks of the training split."""
    torch.manual_seed(0)
    model = Conv4(hidden=32).to(dtype)
    algo = Engine(ALGORITHMS[algorithm](model, inner_lr=0.4, inner_steps=1), mode)
    batch = EpisodeSampler(images, 5, 1, 5, seed=seed, split="train", dtype=dtype).sample(4)
    algo.meta_step(batch)
    named = dict(model.named_parameters())
    named.update({f"learnable.{i}": p for i, p in enumerate(algo.meta_parameters())})
    return {n: p.grad.double() for n, p in named.items()}


@pytest.fixture(scope="module")
def train_images(omniglot):
    from metalearn.data.splits import omniglot_maml_split

    return omniglot.images[omniglot_maml_split()["train"]]


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_path_is_as_accurate_as_the_loop_in_float32(train_images, algorithm, seed):
    ref = meta_gradient(algorithm, train_images, "loop", torch.float64, seed)
    errors = {mode: relative_error(meta_gradient(algorithm, train_images, mode, torch.float32, seed), ref)
              for mode in PATHS}
    assert errors["loop"] > 0, "float32 and float64 agree exactly: the comparison is vacuous"
    for mode in PATHS:
        assert errors[mode] <= max(10 * errors["loop"], 1e-6) and errors[mode] <= 1e-4, errors


def test_channels_last_batchnorm_is_as_accurate_as_nchw(train_images):
    """The model-level fix, on its own: a channels-last real batch is as close to float64 as the NCHW batch."""
    from metalearn.inner.layout import channels_last

    torch.manual_seed(0)
    model = Conv4(hidden=32)
    x = train_images[:75, 0].float() / 255
    ref = model.double()(x.double())
    model.float()
    nchw, cl = model(x), model(channels_last(x))
    assert not model.features[0].conv(channels_last(x)).is_contiguous()  # the channels-last path really runs

    def relative_error(t):
        return ((t.double() - ref).norm() / ref.norm()).item()

    assert relative_error(cl) <= 10 * relative_error(nchw) + 1e-7
