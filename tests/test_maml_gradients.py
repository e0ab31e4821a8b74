"""Meta-gradients in float64 against an independent per-task reference, learn2learn and higher."""
import copy

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import MAML
from metalearn.engine import Engine
from metalearn.inner import inner_loop
from metalearn.models import Conv4
from metalearn.types import Examples, TaskBatch

from conftest import baseline
from reference import maml_meta_gradient

TASKS, WAYS, SHOTS, QUERY, STEPS, LR = 4, 5, 1, 3, 2, 0.4


def make_batch(seed=0, dtype=torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(TASKS, WAYS * SHOTS, 1, 28, 28, generator=g, dtype=dtype)
    qx = torch.rand(TASKS, WAYS * QUERY, 1, 28, 28, generator=g, dtype=dtype)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1)
    qy = torch.arange(WAYS).repeat_interleave(QUERY).expand(TASKS, -1)
    return TaskBatch(Examples(sx, sy), Examples(qx, qy), WAYS, SHOTS, QUERY)


def make_model(seed=0, batchnorm=True) -> Conv4:
    torch.manual_seed(seed)
    m = Conv4(hidden=8, num_classes=WAYS, batchnorm=batchnorm).double()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def ours(model, batch, first_order, adapt=("*",)) -> dict:
    algo = Engine(MAML(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order, adapt=adapt))
    model.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(a: dict, b: dict, rtol=1e-10):
    assert a.keys() == b.keys()
    va = torch.cat([a[k].flatten() for k in a])
    vb = torch.cat([b[k].flatten() for k in a])
    rel = ((va - vb).abs().max() / vb.abs().max()).item()
    assert rel <= rtol, f"relative difference {rel:.3e} > {rtol:.0e}"


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("batchnorm", [True, False], ids=["bn", "nobn"])
def test_meta_gradient_matches_reference(first_order, batchnorm):
    model, batch = make_model(batchnorm=batchnorm), make_batch()
    got = ours(model, batch, first_order)
    ref = maml_meta_gradient(dict(model.named_parameters()), batch, lr=LR, steps=STEPS, first_order=first_order,
                             batchnorm=batchnorm)
    assert_close(got, ref)


def test_second_and_first_order_differ():
    """Guards the test above against comparing two identical approximations."""
    model, batch = make_model(), make_batch()
    so, fo = ours(model, batch, False), ours(model, batch, True)
    rel = max((so[k] - fo[k]).abs().max().item() for k in so) / max(so[k].abs().max().item() for k in so)
    assert rel > 1e-3


def test_head_only_mask_matches_reference():
    model, batch = make_model(), make_batch()
    got = ours(model, batch, False, adapt=("head.*",))
    ref = maml_meta_gradient(dict(model.named_parameters()), batch, lr=LR, steps=STEPS, first_order=False,
                             adapt=["head.weight", "head.bias"])
    assert_close(got, ref)


def test_mask_leaves_unselected_parameters_bit_identical():
    model, batch = make_model(), make_batch()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    fast = inner_loop(model, params, batch.support.task(0), adapt=["head.weight", "head.bias"], lr=LR, steps=3)
    for name in params:
        if name.startswith("head."):
            assert not torch.equal(fast[name], before[name])
        else:
            assert fast[name] is params[name] and torch.equal(fast[name], before[name])
    for name, p in model.named_parameters():  # the module itself is never touched
        assert torch.equal(p, before[name])


@pytest.mark.baselines
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_meta_gradient_matches_learn2learn(first_order):
    l2l = baseline("learn2learn")
    model, batch = make_model(), make_batch()
    got = ours(model, batch, first_order)

    theirs = copy.deepcopy(model)
    maml = l2l.algorithms.MAML(theirs, lr=LR, first_order=first_order)
    for t in range(TASKS):
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(F.cross_entropy(learner(batch.support.x[t]), batch.support.y[t]))
        (F.cross_entropy(learner(batch.query.x[t]), batch.query.y[t]) / TASKS).backward()
    assert_close(got, {n: p.grad for n, p in theirs.named_parameters()})


@pytest.mark.baselines
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_meta_gradient_matches_higher(first_order):
    higher = baseline("higher")
    model, batch = make_model(), make_batch()
    got = ours(model, batch, first_order)

    theirs = copy.deepcopy(model)
    inner_opt = torch.optim.SGD(theirs.parameters(), lr=LR)
    detach = (lambda grads: [g.detach() for g in grads]) if first_order else None
    for t in range(TASKS):
        with higher.innerloop_ctx(theirs, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(F.cross_entropy(fmodel(batch.support.x[t]), batch.support.y[t]), grad_callback=detach)
            (F.cross_entropy(fmodel(batch.query.x[t]), batch.query.y[t]) / TASKS).backward()
    assert_close(got, {n: p.grad for n, p in theirs.named_parameters()})
