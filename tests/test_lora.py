"""LoRA deltas (metalearn/inner/lora.py): zero-initialised deltas reproduce the base model exactly,
the task-dimension merge equals the per-task merge, and LoRA-MAML's meta-gradient equals an
independent per-task reference (tests/reference.py's functional conv4, written-out updates) in float64."""
import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import MAML
from metalearn.config import load_config
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.inner import forward
from metalearn.inner.lora import LoRA, lora_targets

from reference import conv4_forward
from test_maml_gradients import LR, STEPS, TASKS, assert_close, make_batch, make_model

WEIGHTS = ["features.0.conv.weight", "features.3.conv.weight", "head.weight"]


def test_zero_initialised_deltas_reproduce_the_base_model_exactly():
    model = make_model()
    params = dict(model.named_parameters())
    lora = LoRA(params, WEIGHTS, rank=3, alpha=6.0, seed=1)
    x = make_batch().support.x[0]
    merged = lora.merge({**params, **lora.init(x)})
    assert set(merged) == set(params)
    for n in params:
        assert torch.equal(merged[n], params[n]), n
    assert torch.equal(forward(model, merged, x), model(x))


def test_merge_is_w_plus_scaled_low_rank_product_and_task_dimension_matches_per_task():
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    lora = LoRA(params, WEIGHTS, rank=2, alpha=3.0)
    assert lora.scale == 1.5
    g = torch.Generator().manual_seed(0)
    per_task = []
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=g, dtype=torch.float64)
             for k, v in lora.init(params["head.weight"]).items()}
        per_task.append(d)
    for d in per_task:
        m = lora.merge({**params, **d})
        w = params["features.0.conv.weight"]
        expect = w + 1.5 * (d["features.0.conv.weight.lora_B"] @ d["features.0.conv.weight.lora_A"]).view_as(w)
        assert torch.equal(m["features.0.conv.weight"], expect)
    stacked = {k: torch.stack([d[k] for d in per_task]) for k in per_task[0]}
    batched = lora.merge({**params, **stacked})
    for t, d in enumerate(per_task):
        one = lora.merge({**params, **d})
        for n in WEIGHTS:
            torch.testing.assert_close(batched[n][t], one[n], rtol=1e-14, atol=1e-14)


def test_counts_and_target_split():
    params = dict(make_model().named_parameters())
    low, full = lora_targets(params, list(params))
    assert all(params[n].dim() >= 2 for n in low) and all(params[n].dim() == 1 for n in full)
    lora = LoRA(params, ["features.1.conv.weight"], rank=2)
    # (8, 8, 3, 3): A (2, 72) + B (8, 2) = 160 entries instead of 576
    assert lora.counts() == {"lora": 2 * 72 + 8 * 2, "full": 576}
    with pytest.raises(MetalearnError, match="needs weights with >= 2 dims"):
        LoRA(params, ["head.bias"], rank=2)


def lora_maml_reference(w0, batch, lora, *, lr, steps, first_order, full):
    """Per task: deltas (A0, 0) and the 1-dim `full` tensors take `steps` SGD steps on the support loss
    of conv4 at W0 + scale * B A; meta-gradient of the mean query loss w.r.t. w0 (plain autograd)."""
    w0 = {k: v.detach().clone().requires_grad_(True) for k, v in w0.items()}
    total = 0.0

    def merged(w, d):
        out = dict(w)
        for n in lora.names:
            out[n] = w[n] + lora.scale * (d[n + ".lora_B"] @ d[n + ".lora_A"]).reshape(w[n].shape)
        return out

    for t in range(batch.num_tasks):
        w = dict(w0)
        d = {}
        for n in lora.names:
            d[n + ".lora_A"] = lora._a0[n].clone().requires_grad_(True)
            d[n + ".lora_B"] = torch.zeros(w0[n].shape[0], lora.rank, dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            loss = F.cross_entropy(conv4_forward(merged(w, d), batch.support.x[t]), batch.support.y[t])
            keys = list(d) + list(full)
            g = torch.autograd.grad(loss, [d[k] if k in d else w[k] for k in keys], create_graph=not first_order)
            for k, gk in zip(keys, g):
                if k in d:
                    d[k] = d[k] - lr * gk
                else:
                    w[k] = w[k] - lr * gk
        total = total + F.cross_entropy(conv4_forward(merged(w, d), batch.query.x[t]), batch.query.y[t])
    grads = torch.autograd.grad(total / batch.num_tasks, list(w0.values()))
    return dict(zip(w0, grads))


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("adapt", [["*"], ["features.3.*", "head.*"]], ids=["all", "top"])
def test_lora_maml_meta_gradient_matches_reference(first_order, adapt):
    model, batch = make_model(), make_batch()
    maml = MAML(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order, adapt=adapt)
    algo = Engine(maml.use_lora(2, alpha=4.0, seed=3))
    assert algo.plan()[0] == "loop"
    model.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref = lora_maml_reference(dict(model.named_parameters()), batch, algo.lora, lr=LR, steps=STEPS,
                              first_order=first_order, full=algo.lora_full)
    assert_close(got, ref)
    # and it is not plain MAML: the low-rank inner loop gives a different meta-gradient
    plain = Engine(MAML(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order, adapt=adapt))
    model.zero_grad(set_to_none=True)
    plain.meta_step(batch)
    assert not torch.allclose(model.features[3].conv.weight.grad, got["features.3.conv.weight"])


def test_lora_maml_evaluation_leaves_the_model_unchanged_and_differs_from_no_adaptation():
    model, batch = make_model(), make_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = Engine(MAML(model, inner_lr=LR, inner_steps=STEPS).use_lora(2))
    acc = algo.evaluate_batch(batch, steps=3, lr=0.4)
    assert acc.shape == (TASKS,)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_lora_config_is_validated_and_built(tmp_path):
    cfg = load_config(None, ["inner.lora_rank=2", "model.hidden=8"])
    from metalearn.models import build_model
    from metalearn.train import build_algorithm

    algo = build_algorithm(cfg, build_model(cfg.model, 1, 5, 28))
    assert algo.lora is not None and algo.lora.rank == 2
    with pytest.raises(MetalearnError, match="inner.lora_rank"):
        load_config(None, ["inner.lora_rank=2", "outer.algorithm=anil"])
    with pytest.raises(MetalearnError, match="inner.lora_rank"):
        load_config(None, ["inner.lora_rank=-1"])
