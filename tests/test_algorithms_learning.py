"""Short learning runs on real Omniglot 5-way 1-shot: each algorithm (Reptile in its own test), meta-trained
for a few dozen outer steps of a small conv4 (hidden 16, 4 tasks per step), must score clearly better on fixed
TEST episodes than the same network before meta-training (adapted the same way), and above a
stated absolute floor. 5-way chance is 20%.

The loop mirrors train.py's order (schedule, meta_step, outer step) with the same sampler and
evaluation code. Measured numbers behind each floor are in MEASURED (printed with -s).
"""
import time

import pytest
import torch

from metalearn.algorithms import ANIL, BOIL, MAML, MAMLPlusPlus, MetaSGD, ProtoNet, Reptile
from metalearn.config import DataConfig
from metalearn.data import EpisodeSampler, open_dataset
from metalearn.engine import Engine
from metalearn.evaluation import evaluate
from metalearn.models import Conv4, Conv4PerStep

HIDDEN, META_BATCH, QUERY, EVAL_QUERY, EPISODES, STEPS = 16, 4, 2, 5, 50, 40


@pytest.fixture(scope="module")
def omniglot_splits(data_root, cache_dir):
    cfg = DataConfig(dataset="omniglot", root=str(data_root / "omniglot"), cache_dir=str(cache_dir))
    ds, splits = open_dataset(cfg)
    return {k: ds.images[v] for k, v in splits.items()}


MAKERS = {
    "maml": lambda m: MAML(m, inner_lr=0.4, inner_steps=1),
    "fomaml": lambda m: MAML(m, inner_lr=0.4, inner_steps=1, first_order=True),
    "anil": lambda m: ANIL(m, inner_lr=0.4, inner_steps=1),
    "boil": lambda m: BOIL(m, inner_lr=0.4, inner_steps=1),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.4, inner_steps=1),
    "protonet": lambda m: ProtoNet(m),
    "mamlpp": lambda m: MAMLPlusPlus(m, inner_lr=0.4, inner_steps=2, msl_iterations=20, first_order_until=10),
}
OUTER_LR = {"fomaml": 1e-2}  # at 3e-3, 40 first-order steps only reached 28.4% (measured)
EVAL = {"mamlpp": dict(inner_steps=2, inner_lr=0.4)}

# Test accuracy (50 fixed episodes, 5 queries per class) untrained -> after 40 steps, measured with
# this file on CPU, seed 0 (2026-11-25). Each floor sits well below the measurement and well above
# the untrained network; every run must also beat its own untrained accuracy by MARGIN.
#   maml 24.4 -> 47.0   fomaml 24.4 -> 36.3   anil 25.4 -> 48.1   boil 24.5 -> 52.2
#   metasgd 24.4 -> 46.9   protonet 44.7 -> 72.2 (prototypes of random conv features already
#   beat chance)   mamlpp 36.2 -> 51.1 (2 inner steps)
# Reptile has its own test below: with 1-shot training tasks and 40 steps it did not improve
# (55.0 -> 54.6%); it needs OpenAI's 10 "train shots" per class and a few hundred steps.
FLOORS = {"maml": 0.38, "fomaml": 0.31, "anil": 0.38, "boil": 0.40, "metasgd": 0.38, "protonet": 0.60,
          "mamlpp": 0.44}
MARGIN = 0.08


def model_for(name):
    torch.manual_seed(0)
    if name == "mamlpp":
        return Conv4PerStep(hidden=HIDDEN, num_classes=5, steps=2)
    return Conv4(hidden=HIDDEN, num_classes=5)


def query_accuracy(algo, splits, name):
    ev = EVAL.get(name, dict(inner_steps=1, inner_lr=0.4))
    return evaluate(algo, splits["test"], ways=5, shots=1, query_shots=EVAL_QUERY, episodes=EPISODES, seed=0,
                    batch_size=50, **ev).mean


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MAKERS))
def test_short_run_improves_on_omniglot(omniglot_splits, name):
    model = model_for(name)
    algo = Engine(MAKERS[name](model))  # execution auto, as train.build_algorithm's default
    before = query_accuracy(algo, omniglot_splits, name)
    opt = algo.outer_optimizer(model.parameters(), OUTER_LR.get(name, 3e-3))
    sampler = EpisodeSampler(omniglot_splits["train"], 5, 1, QUERY, seed=0, split="train")
    t0 = time.perf_counter()
    for step in range(1, STEPS + 1):
        model.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        algo.schedule(step, STEPS, opt)
        algo.meta_step(sampler.sample(META_BATCH))
        opt.step()
    after = query_accuracy(algo, omniglot_splits, name)
    print(f"\n{name}: test accuracy {100 * before:.1f}% untrained -> {100 * after:.1f}% after {STEPS} steps "
          f"({time.perf_counter() - t0:.0f}s)")
    assert after >= before + MARGIN and after >= FLOORS[name], (name, before, after)


@pytest.mark.slow
def test_sinusoid_maml_reaches_mse_below_one_after_one_step():
    """MAML's sinusoid setting (Finn et al. 2017, Sec. 5.1): MLP 1-40-40-1, K = 10, inner lr 0.01, one
    inner step, Adam 1e-3, 10 tasks per step. Measured (seed 0, 3000 steps): MSE on 200 fixed episodes
    0.964 after one inner step, 3.23 before adapting (a constant-zero predictor scores ~4.2)."""
    from metalearn.data.sinusoid import SinusoidSampler, fixed_sinusoid_episodes
    from metalearn.models import MLP

    torch.manual_seed(0)
    model = MLP()
    algo = Engine(MAML(model, inner_lr=0.01, inner_steps=1, loss="mse"))
    opt = algo.outer_optimizer(model.parameters(), 1e-3)
    sampler = SinusoidSampler(10, 10, seed=0)
    for _ in range(3000):
        opt.zero_grad(set_to_none=True)
        algo.meta_step(sampler.sample(10))
        opt.step()
    mse = lambda steps: torch.cat([algo.evaluate_batch(b, steps=steps, lr=0.01)  # noqa: E731
                                   for b in fixed_sinusoid_episodes(10, 10, 200, seed=0)]).mean().item()
    after, before = mse(1), mse(0)
    print(f"\nsinusoid MAML: MSE {before:.3f} before adapting, {after:.3f} after one step")
    assert after < 1.0 and before > 2.0, (before, after)


@pytest.mark.slow
def test_reptile_improves_on_omniglot(omniglot_splits):
    """Reptile as in OpenAI's run_omniglot.py (5 inner Adam steps of lr 1e-3 with beta1 = 0 on mini-batches
    of 10, meta-batch 5, epsilon annealed 1 -> 0), trained on tasks with 10 shots per class (OpenAI's
    --train-shots 10 --inner-batch 10), evaluated 1-shot with 50 inner steps, transductive. Measured here
    (200 steps, 50 episodes, CPU, 2026-11-30): 45.1% untrained -> 59.0% (full-batch inner steps, before
    reptile.inner_batch_size existed, took twice as long). Floor 0.55 and +8 points over the untrained
    network."""
    torch.manual_seed(0)
    model = Conv4(hidden=HIDDEN, num_classes=5)
    algo = Reptile(model, inner_lr=1e-3, inner_steps=5, inner_batch_size=10)
    acc = lambda: evaluate(algo, omniglot_splits["test"], ways=5, shots=1, query_shots=EVAL_QUERY,  # noqa: E731
                           episodes=EPISODES, seed=0, batch_size=50, inner_steps=50, inner_lr=1e-3).mean
    before = acc()
    opt = algo.outer_optimizer(model.parameters(), 1.0)
    sampler = EpisodeSampler(omniglot_splits["train"], 5, 10, QUERY, seed=0, split="train")
    steps = 200
    for step in range(1, steps + 1):
        model.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        algo.schedule(step, steps, opt)
        algo.meta_step(sampler.sample(5))
        opt.step()
    after = acc()
    print(f"\nreptile: test accuracy {100 * before:.1f}% untrained -> {100 * after:.1f}% after {steps} steps")
    assert after >= before + MARGIN and after >= 0.55, (before, after)
