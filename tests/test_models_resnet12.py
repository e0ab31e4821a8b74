"""ResNet-12 (metalearn/models/resnet12.py): shapes, parameter names, options and their checks, DropBlock
(train vs eval, rate 0, drop fraction, block shape, seeding, vmap), and MAML's float64 meta-gradient on a
small-width ResNet-12 against an independent per-task reference (written below with torch.nn.functional)."""
import pytest
import torch
from torch import nn

from metalearn.algorithms import ANIL, MAML
from metalearn.config import load_config
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.models import DropBlock, ResNet12, build_model
from metalearn.models.resnet12 import drop_block
from metalearn.types import Examples, TaskBatch

from reference import general_meta_gradient
from reference import resnet12_forward as reference_forward
from test_maml_gradients import assert_close

SMALL = [4, 8, 8, 16]
TASKS, WAYS, SHOTS, QUERY, STEPS, LR = 2, 3, 1, 2, 2, 0.1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def make_batch(size=16, channels=3, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(TASKS, WAYS * SHOTS, channels, size, size, generator=g, dtype=torch.float64)
    qx = torch.rand(TASKS, WAYS * QUERY, channels, size, size, generator=g, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1)
    qy = torch.arange(WAYS).repeat_interleave(QUERY).expand(TASKS, -1)
    return TaskBatch(Examples(sx, sy), Examples(qx, qy), WAYS, SHOTS, QUERY)


def make_model(seed=0, **options) -> ResNet12:
    torch.manual_seed(seed)
    m = ResNet12(in_channels=3, num_classes=WAYS, image_size=16, channels=SMALL, **options).double()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def test_paper_widths_shapes_and_size():
    m = ResNet12(in_channels=3, num_classes=5, image_size=84)
    x = torch.randn(2, 3, 84, 84)
    assert m.features(x).shape == (2, 640, 1, 1) and m(x).shape == (2, 5)
    assert [b.conv1.out_channels for b in m.features[:4]] == [64, 160, 320, 640]
    assert 12.3e6 < sum(p.numel() for p in m.parameters()) < 12.5e6  # MetaOptNet's ResNet-12: about 12.4M


@pytest.mark.parametrize("size,side", [(28, 1), (84, 5), (32, 2), (16, 1)])
def test_small_widths_any_image_size(size, side):
    m = ResNet12(in_channels=1, num_classes=7, image_size=size, channels=SMALL)
    h = m.features[:4](torch.randn(3, 1, size, size))
    assert h.shape == (3, 16, side, side)
    assert m(torch.randn(3, 1, size, size)).shape == (3, 7)


def test_parameter_names_read_well_in_masks():
    m = ResNet12(in_channels=3, num_classes=5, channels=SMALL)
    names = [n for n, _ in m.named_parameters()]
    block = ["conv1.weight", "norm1.weight", "norm1.bias", "conv2.weight", "norm2.weight", "norm2.bias",
             "conv3.weight", "norm3.weight", "norm3.bias", "shortcut.conv.weight", "shortcut.norm.weight",
             "shortcut.norm.bias"]
    assert names == [f"features.{i}.{n}" for i in range(4) for n in block] + ["head.weight", "head.bias"]
    assert not list(m.buffers())  # transductive BatchNorm: no running statistics
    assert all(not m_.track_running_stats for m_ in m.modules() if isinstance(m_, nn.BatchNorm2d))


def test_forward_is_head_of_flattened_features():
    m = make_model().eval()
    x = make_batch().query.x[0]
    torch.testing.assert_close(m(x), m.head(m.features(x).flatten(1)), rtol=0, atol=0)


def test_forward_matches_the_functional_reference():
    m, x = make_model(), make_batch().query.x[0]
    torch.testing.assert_close(m(x), reference_forward(dict(m.named_parameters()), x), rtol=1e-12, atol=1e-12)


def test_without_batchnorm_convolutions_have_biases():
    m = ResNet12(in_channels=1, num_classes=5, image_size=28, batchnorm=False, channels=SMALL)
    names = [n for n, _ in m.named_parameters()]
    assert not any("norm" in n for n in names) and "features.0.conv1.bias" in names
    assert "features.3.shortcut.conv.bias" in names and m(torch.randn(2, 1, 28, 28)).shape == (2, 5)


def test_bad_options_and_image_size():
    with pytest.raises(ValueError, match="channels must be 4 positive integers"):
        ResNet12(channels=[8, 16, 32])
    with pytest.raises(ValueError, match="drop_rate"):
        ResNet12(channels=SMALL, drop_rate=1.0)
    with pytest.raises(ValueError, match="dropblock_size"):
        ResNet12(channels=SMALL, dropblock_size=0)
    with pytest.raises(ValueError, match="at least 16x16"):
        ResNet12(channels=SMALL, image_size=15)


# --- the registry, model.kwargs and validation ---------------------------------------------------
def test_built_from_config_with_kwargs_hidden_not_used():
    cfg = load_config(None, ["model.name=resnet12", "model.hidden=32", "data.image_size=28",
                             "model.kwargs={channels: [8, 16, 32, 64], drop_rate: 0.1, dropblock_size: 2}"])
    m = build_model(cfg.model, 1, 5, 28)
    assert isinstance(m, ResNet12) and m.channels == [8, 16, 32, 64] and m.head.in_features == 64
    assert isinstance(m.features[0].drop, nn.Dropout) and m.features[0].drop.p == 0.1
    assert isinstance(m.features[3].drop, DropBlock) and m.features[3].drop.block_size == 2
    plain = build_model(load_config(None, ["model.name=resnet12", "model.batchnorm=none",
                                           "model.kwargs={channels: [8, 16, 32, 64]}"]).model, 1, 5, 28)
    assert not any(isinstance(x, (nn.BatchNorm2d, nn.Dropout, DropBlock)) for x in plain.modules())


@pytest.mark.parametrize("overrides,match", [
    (["model.kwargs={widths: [8, 8, 8, 8]}"], r"^model.kwargs: resnet12 takes no option 'widths' \(its options: "
                                              r"channels, drop_rate, dropblock_size\)$"),
    (["model.kwargs={channels: [8, 8]}"], "^model.kwargs: channels must be 4 positive integers"),
    (["model.kwargs={drop_rate: -0.1}"], "^model.kwargs: drop_rate must be a number in"),
    (["model.kwargs={hidden: 8}"], "^model.kwargs: resnet12 takes no option 'hidden'"),
    (["model.kwargs={in_channels: 3}"], r"^model.kwargs: in_channels is set by metalearn \(from the data set's "),
    (["data.image_size=12"], "^data.image_size: resnet12 needs images of at least 16x16 pixels"),
])
def test_config_errors_before_any_work(overrides, match):
    with pytest.raises(MetalearnError, match=match):
        load_config(None, ["model.name=resnet12", *overrides])


def test_model_kwargs_for_the_other_shipped_models():
    cfg = load_config(None, ["data.dataset=sinusoid", "data.ways=1", "model.name=mlp", "model.kwargs={layers: 3}"])
    assert len([m for m in build_model(cfg.model, 1, 1, 28).features if isinstance(m, nn.Linear)]) == 3
    with pytest.raises(MetalearnError, match=r"^model.kwargs: conv4 takes no option 'width' \(its options: no options"):
        load_config(None, ["model.kwargs={width: 3}"])
    with pytest.raises(MetalearnError, match=r"^model.kwargs: steps is set by metalearn \(from model.bn_steps\)"):
        load_config(None, ["model.name=conv4_perstep", "model.kwargs={steps: 3}"])
    with pytest.raises(MetalearnError, match="^model.name: unknown model 'resnet13'; known: conv4, conv4_perstep, "
                                             "mlp, resnet12, or your own as module.path:ClassName$"):
        load_config(None, ["model.name=resnet13"])


# --- DropBlock -----------------------------------------------------------------------------------
def test_dropblock_train_eval_and_rate_zero():
    x = torch.randn(8, 4, 12, 12)
    block = DropBlock(0.3, 3)
    y = block(x)
    assert (y == 0).any() and not torch.equal(y, x)
    assert torch.equal(block.eval()(x), x)  # eval mode: identity
    assert torch.equal(DropBlock(0.0, 3)(x), x)  # rate 0: identity in training mode too
    m = make_model()  # drop_rate 0: no dropout modules, and two training-mode passes agree to the bit
    assert not any(isinstance(x_, (nn.Dropout, DropBlock)) for x_ in m.modules())
    x = make_batch().query.x[0]
    assert torch.equal(m(x), m(x))


def test_dropblock_in_the_model_only_in_training_mode():
    m = make_model(drop_rate=0.2, dropblock_size=2)
    x = make_batch().query.x[0]
    assert not torch.equal(m(x), m(x))  # fresh masks each pass
    m.eval()
    assert torch.equal(m(x), m(x))
    torch.testing.assert_close(m(x), make_model()(x), rtol=0, atol=0)  # eval = the same network without drops


@pytest.mark.parametrize("side,block", [(40, 5), (20, 3), (3, 5), (5, 5)])
def test_dropblock_drops_about_the_rate(side, block):
    """The expected dropped fraction is rate, a little less where blocks overlap; kept units are scaled by
    numel / kept, so the mean of a constant map is kept exactly."""
    torch.manual_seed(0)
    x = torch.ones(64, 16, side, side, dtype=torch.float64)
    y = drop_block(x, 0.1, block)
    frac = (y == 0).double().mean().item()
    assert 0.075 < frac < 0.11, frac
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - frac)))
    torch.testing.assert_close(y.mean(), x.mean())


def test_dropblock_drops_square_blocks(monkeypatch):
    """A seed at (i, j) drops the block [i, i+b) x [j, j+b); seeds only where a whole block fits."""
    x = torch.ones(1, 1, 10, 10)

    def one_seed(t, **kw):  # rand_like on the seed region (10-3+1 = 8 per side): one draw below any gamma
        assert t.shape == (1, 1, 8, 8)
        r = torch.ones_like(t)
        r[0, 0, 2, 5] = 0
        return r

    monkeypatch.setattr(torch, "rand_like", one_seed)
    y = drop_block(x, 0.1, 3)
    expect = torch.ones(10, 10)
    expect[2:5, 5:8] = 0
    assert torch.equal(y[0, 0] == 0, expect == 0)
    torch.testing.assert_close(y[0, 0][expect == 1], torch.full((91,), 100 / 91))


def test_dropblock_is_seeded_and_gradients_pass_kept_units_only():
    x = torch.randn(4, 3, 9, 9, requires_grad=True)
    torch.manual_seed(5)
    a = drop_block(x, 0.2, 3)
    torch.manual_seed(5)
    b = drop_block(x, 0.2, 3)
    torch.manual_seed(6)
    c = drop_block(x, 0.2, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    (g,) = torch.autograd.grad(a.sum(), x)
    assert torch.equal(g == 0, a.detach() == 0)  # dropped units pass no gradient, kept ones the scale


def test_dropblock_under_vmap_draws_a_mask_per_task():
    x = torch.ones(5, 2, 3, 10, 10)
    y = torch.func.vmap(lambda t: drop_block(t, 0.3, 3), randomness="different")(x)
    masks = (y == 0).flatten(1)
    assert y.shape == x.shape and masks.any(1).all()
    assert len({tuple(m.tolist()) for m in masks}) == 5  # a different mask for every task
    for t in range(5):  # each task rescaled by its own kept count
        torch.testing.assert_close(y[t].mean(), torch.tensor(1.0))
    m = make_model(drop_rate=0.2, dropblock_size=2)
    out = torch.func.vmap(lambda t: torch.func.functional_call(m, dict(m.named_parameters()), (t,)),
                          randomness="different")(make_batch().query.x)
    assert out.shape == (TASKS, WAYS * QUERY, WAYS) and torch.isfinite(out).all()


# --- meta-learning on ResNet-12 ------------------------------------------------------------------
@pytest.mark.parametrize("execution", ["loop", "auto"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_maml_meta_gradient_matches_reference(first_order, execution):
    model, batch = make_model(), make_batch()
    learner = Engine(MAML(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order), execution)
    model.zero_grad(set_to_none=True)
    metrics = learner.meta_step(batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    w0 = dict(model.named_parameters())
    ref, _ = general_meta_gradient(w0, batch, steps=STEPS, first_order=first_order,
                                   lrs={n: torch.tensor(LR, dtype=torch.float64) for n in w0},
                                   forward=lambda w, x, s: reference_forward(w, x))
    assert_close(got, ref)
    assert set(metrics) == {"loss", "accuracy"}


def test_meta_training_steps_with_dropblock_and_anil():
    """A few MAML steps with DropBlock on (training mode), then ANIL (adapts head.*, caches model.features)."""
    model, batch = make_model(drop_rate=0.1, dropblock_size=2), make_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = Engine(MAML(model, inner_lr=LR, inner_steps=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        metrics = learner.meta_step(batch)
        opt.step()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    scores = learner.evaluate_batch(batch, steps=2)  # in eval mode: no drops, so the same scores twice
    assert scores.shape == (TASKS,) and torch.equal(scores, learner.evaluate_batch(batch, steps=2))
    assert model.training and all(m.training for m in model.modules())  # training mode restored
    anil = Engine(ANIL(make_model(), inner_lr=LR, inner_steps=2))
    assert set(anil.meta_step(batch)) == {"loss", "accuracy"}
