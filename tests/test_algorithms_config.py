"""Every algorithm is reachable from the config: outer.algorithm -> build_algorithm -> a learner whose
outer optimiser, schedule hook, meta_step and evaluate_batch work (tiny random episodes, no data)."""
import pytest
import torch

from metalearn.algorithms import ALGORITHMS, FOMAML, MAML, MAMLPlusPlus, Reptile
from metalearn.config import load_config
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.models import Conv4
from metalearn.train import build_algorithm

from test_maml_gradients import make_batch


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - {"finetune"}))  # finetune: tests/test_transfer.py
def test_each_algorithm_builds_steps_and_evaluates(name):
    cfg = load_config(None, [f"outer.algorithm={name}", "inner.steps=2", "reptile.final_lr=0.1", "mamlpp.final_lr=0.1",
                             "mamlpp.msl_iterations=5", "mamlpp.first_order_until=1"])
    torch.manual_seed(0)
    model = Conv4(hidden=8).double()
    algo = build_algorithm(cfg, model)
    assert isinstance(algo, Engine) and isinstance(algo.algorithm, ALGORITHMS[name])
    opt = algo.outer_optimizer(list(model.parameters()), 0.5 if name == "reptile" else 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = make_batch().tasks(slice(0, 1))  # one task keeps this fast
    opt.zero_grad(set_to_none=True)
    algo.schedule(1, 10, opt)
    metrics = algo.meta_step(batch)
    opt.step()
    assert {"loss", "accuracy"} <= set(metrics) and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    for transductive in (True, False):
        acc = algo.evaluate_batch(batch, steps=1, lr=0.1, transductive=transductive)
        assert acc.shape == (batch.num_tasks,) and acc.dtype == torch.float64


def test_defaults_per_algorithm():
    model = Conv4(hidden=8)
    fomaml = build_algorithm(load_config(None, ["outer.algorithm=fomaml"]), model)
    assert isinstance(fomaml.algorithm, FOMAML) and isinstance(fomaml.algorithm, MAML) and fomaml.first_order
    anil = build_algorithm(load_config(None, ["outer.algorithm=anil"]), model)
    assert anil.adapt == ["head.weight", "head.bias"]
    boil = build_algorithm(load_config(None, ["outer.algorithm=boil"]), model)
    assert all(n.startswith("features.") for n in boil.adapt)
    rep = build_algorithm(load_config(None, ["outer.algorithm=reptile", "outer.lr=1.0"]), model)
    assert isinstance(rep.algorithm, Reptile) and rep.final_lr == 0.0
    assert isinstance(rep.outer_optimizer(model.parameters(), 1.0), torch.optim.SGD)


def test_bad_algorithm_and_masks_are_one_line_errors():
    with pytest.raises(MetalearnError, match="outer.algorithm: unknown algorithm 'mamI'"):
        load_config(None, ["outer.algorithm=mamI"])
    with pytest.raises(MetalearnError, match="mamlpp.first_order_until must be >= 0"):
        load_config(None, ["mamlpp.first_order_until=-1"])
    model = Conv4(hidden=8)
    with pytest.raises(MetalearnError, match="anil adapts only the head"):
        build_algorithm(load_config(None, ["outer.algorithm=anil", "inner.adapt=[features.0.*]"]), model)
    with pytest.raises(MetalearnError, match="boil keeps the head fixed"):
        build_algorithm(load_config(None, ["outer.algorithm=boil", "inner.adapt=[head.*]"]), model)


def test_evaluate_records_the_transductive_flag_and_per_episode_results():
    from metalearn.evaluation import evaluate

    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 4, 1, 28, 28), dtype=torch.uint8)
    algo = Engine(MAML(Conv4(hidden=8), inner_lr=0.1, inner_steps=1))
    a = evaluate(algo, images, ways=5, shots=1, query_shots=1, episodes=3, seed=0, inner_steps=1, inner_lr=0.1,
                 transductive=False)
    b = evaluate(algo, images, ways=5, shots=1, query_shots=1, episodes=3, seed=0, inner_steps=1, inner_lr=0.1)
    assert a.transductive is False and b.transductive is True and a.to_dict()["transductive"] is False
    assert len(a.accuracies) == len(b.accuracies) == 3


def test_mamlpp_model_from_config():
    from metalearn.models import Conv4PerStep, build_model

    cfg = load_config(None, ["outer.algorithm=mamlpp", "model.name=conv4_perstep", "model.bn_steps=3", "inner.steps=3",
                             "model.hidden=8"])
    model = build_model(cfg.model, 1, 5, 28)
    assert isinstance(model, Conv4PerStep) and model.features[0].norm.weight.shape == (3, 8)
    algo = build_algorithm(cfg, model)
    assert isinstance(algo.algorithm, MAMLPlusPlus) and algo.per_step
    assert set(algo.state_dict()["lrs"]) == {n for n, _ in model.named_parameters()}
