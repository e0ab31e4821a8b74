"""Meta-gradients of the algorithm family in float64 (conv4 hidden 8 with BatchNorm, 4 tasks,
2 inner steps) against the independent per-task autograd references in reference.py, against
learn2learn, and against each other where two paths must agree (ANIL cached vs naive)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import ANIL, BOIL, FOMAML, MAML, MetaSGD
from metalearn.engine import Engine
from metalearn.inner import forward

from conftest import baseline
from reference import general_meta_gradient, maml_meta_gradient
from test_maml_gradients import LR, STEPS, TASKS, assert_close, make_batch, make_model

HEAD = ["head.weight", "head.bias"]


def grads_of(algo, batch) -> dict:
    algo.model.zero_grad(set_to_none=True)
    for p in algo.meta_parameters():
        p.grad = None
    algo.meta_step(batch)
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in algo.model.named_parameters()}


# --- ANIL -----------------------------------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_anil_cached_equals_naive_and_reference(first_order):
    model, batch = make_model(), make_batch()
    cached = grads_of(Engine(ANIL(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order)), batch)
    naive = grads_of(Engine(ANIL(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order, cached=False)), batch)
    ref = maml_meta_gradient(dict(model.named_parameters()), batch, lr=LR, steps=STEPS, first_order=first_order,
                             adapt=HEAD)
    assert_close(cached, ref)
    assert_close(naive, ref)
    assert_close(cached, naive, rtol=1e-12)


def test_anil_cached_path_runs_the_body_once_per_task_side():
    """The saving is used: the body runs twice per task (support, query), not once per inner step."""
    model, batch = make_model(), make_batch()
    calls = []
    h = model.features.register_forward_hook(lambda *a: calls.append(1))
    try:
        grads_of(Engine(ANIL(model, inner_lr=LR, inner_steps=5)), batch)
    finally:
        h.remove()
    assert len(calls) == 2 * TASKS


def test_anil_evaluation_cached_equals_naive():
    model, batch = make_model(), make_batch()
    a = Engine(ANIL(model, inner_lr=LR, inner_steps=STEPS)).evaluate_batch(batch, steps=3, lr=0.2)
    b = Engine(ANIL(model, inner_lr=LR, inner_steps=STEPS, cached=False)).evaluate_batch(batch, steps=3, lr=0.2)
    assert torch.equal(a, b)


# --- BOIL -----------------------------------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_boil_matches_reference_with_head_lr_zero(first_order):
    model, batch = make_model(), make_batch()
    got = grads_of(Engine(BOIL(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order)), batch)
    w0 = dict(model.named_parameters())
    # the reference adapts EVERY parameter, with the head's inner lr exactly 0
    lrs = {n: torch.tensor(0.0 if n.startswith("head.") else LR, dtype=torch.float64) for n in w0}
    ref, _ = general_meta_gradient(w0, batch, steps=STEPS, first_order=first_order, lrs=lrs)
    assert_close(got, ref)
    assert got["head.weight"].abs().max() > 0  # the head is still meta-trained


def test_boil_head_is_not_adapted_body_is():
    model, batch = make_model(), make_batch()
    algo = Engine(BOIL(model, inner_lr=LR, inner_steps=STEPS))
    params = algo.params()
    fast = algo._adapt_task(params, batch.support.x[0], batch.support.y[0], steps=STEPS, lr=None,
                            first_order=algo.first_order).params  # the inner loop meta_step runs
    assert all(fast[n] is params[n] for n in HEAD)
    assert all(not torch.equal(fast[n], params[n]) for n in params if n.endswith("conv.weight"))


# --- Meta-SGD -------------------------------------------------------------------------------
def metasgd_reference(model, algo, batch, first_order):
    w0 = dict(model.named_parameters())
    lrs = {n: algo.alpha.lrs[n.replace(".", "__")] for n in w0}
    return general_meta_gradient(w0, batch, steps=STEPS, first_order=first_order, lrs=lrs)


def perturb_alpha(algo, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in algo.alpha.parameters():
            p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_metasgd_matches_reference(first_order):
    model, batch = make_model(), make_batch()
    algo = MetaSGD(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order)
    perturb_alpha(algo)
    got = grads_of(Engine(algo), batch)
    ref_w, ref_a = metasgd_reference(model, algo, batch, first_order)
    assert_close(got, ref_w)
    got_a = {n.replace("__", "."): p.grad for n, p in algo.alpha.lrs.items()}
    assert_close(got_a, ref_a)
    assert max(g.abs().max() for g in got_a.values()) > 0  # first order still trains alpha


def test_metasgd_alpha_is_in_the_outer_optimizer():
    model = make_model()
    algo = MetaSGD(model, inner_lr=LR, inner_steps=STEPS)
    opt = algo.outer_optimizer(model.parameters(), 1e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in algo.alpha.parameters())
    state = algo.state_dict()
    assert set(state["alpha"]) == {n for n, _ in model.named_parameters()}
    other = MetaSGD(make_model(seed=1), inner_lr=0.01, inner_steps=STEPS)
    other.load_state_dict(state)
    assert all(torch.equal(a, state["alpha"][n]) for n, a in other.alpha.by_name().items())


@pytest.mark.baselines
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_metasgd_matches_learn2learn(first_order):
    l2l = baseline("learn2learn")
    model, batch = make_model(), make_batch()
    algo = MetaSGD(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order)
    perturb_alpha(algo)
    got = grads_of(Engine(algo), batch)

    theirs = copy.deepcopy(model)
    meta = l2l.algorithms.MetaSGD(theirs, lr=LR, first_order=first_order)
    with torch.no_grad():
        for lr_t, (n, _) in zip(meta.lrs, theirs.named_parameters()):
            lr_t.copy_(algo.alpha.lrs[n.replace(".", "__")])
    for t in range(TASKS):
        learner = meta.clone()
        for _ in range(STEPS):
            learner.adapt(F.cross_entropy(learner(batch.support.x[t]), batch.support.y[t]))
        (F.cross_entropy(learner(batch.query.x[t]), batch.query.y[t]) / TASKS).backward()
    assert_close(got, {n: p.grad for n, p in theirs.named_parameters()})
    names = [n for n, _ in theirs.named_parameters()]
    assert_close({n: algo.alpha.lrs[n.replace(".", "__")].grad for n in names},
                 {n: lr_t.grad for n, lr_t in zip(names, meta.lrs)})


# --- shared behaviour -------------------------------------------------------------------------
def test_non_transductive_scoring_scores_each_query_with_the_support_set():
    model, batch = make_model(), make_batch()
    algo = Engine(MAML(model, inner_lr=LR, inner_steps=1))
    acc_nt = algo.evaluate_batch(batch, transductive=False)
    # by hand for task 0
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    fast = algo._adapt_task(params, batch.support.x[0], batch.support.y[0], steps=1, lr=None, first_order=True).params
    fast = {n: p.detach() for n, p in fast.items()}
    preds = torch.stack([forward(model, fast, torch.cat([batch.support.x[0], batch.query.x[0][j:j + 1]]))[-1]
                         for j in range(batch.query.x.shape[1])])
    assert acc_nt[0] == (preds.argmax(-1) == batch.query.y[0]).double().mean()
    acc_t = algo.evaluate_batch(batch, transductive=True)
    assert acc_t.shape == acc_nt.shape == (TASKS,)


# --- Reptile --------------------------------------------------------------------------------
def test_reptile_outer_step_equals_hand_computed_interpolation():
    """theta <- theta + eps * mean_i(phi_i - theta), phi_i from torch.optim.Adam(beta1=0) whose state
    carries over from task to task and from step to step (OpenAI's policy), eps annealed linearly.
    No BatchNorm: see test_inner's Adam comparison for why round-off gradients would blur it."""
    from metalearn.algorithms import Reptile

    model, total = make_model(batchnorm=False), 10
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2, betas=(0.0, 0.999))
    algo = Reptile(model, inner_lr=1e-2, inner_steps=3, final_lr=0.1)
    opt = algo.outer_optimizer(model.parameters(), lr=1.0)
    for step, seed in [(1, 0), (2, 1), (7, 2)]:  # three outer steps; eps = 1.0, 0.91, 0.46
        batch = make_batch(seed=seed)
        # by hand
        theta = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        phis = []
        for t in range(TASKS):
            with torch.no_grad():
                for n, p in ref_model.named_parameters():
                    p.copy_(theta[n])
            for _ in range(3):
                ref_opt.zero_grad()
                F.cross_entropy(ref_model(batch.support.x[t]), batch.support.y[t]).backward()
                ref_opt.step()
            phis.append({n: p.detach().clone() for n, p in ref_model.named_parameters()})
        eps = (1 - (step - 1) / total) * 1.0 + (step - 1) / total * 0.1
        expected = {n: theta[n] + eps * (sum(phi[n] for phi in phis) / TASKS - theta[n]) for n in theta}
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                p.copy_(expected[n])
        # ours
        algo.schedule(step, total, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(eps, abs=1e-15)
        model.zero_grad(set_to_none=True)
        algo.meta_step(batch)
        opt.step()
        assert_close(dict(model.named_parameters()), expected, rtol=1e-12)
    assert algo.adam_state.t == 3 * 3 * TASKS


def test_reptile_evaluation_leaves_training_state_alone():
    from metalearn.algorithms import Reptile

    model, batch = make_model(), make_batch()
    algo = Reptile(model, inner_lr=1e-3, inner_steps=2)
    algo.outer_optimizer(model.parameters(), 1.0)
    algo.meta_step(batch)
    before = algo.adam_state.detached()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    a = algo.evaluate_batch(batch, transductive=True)
    b = algo.evaluate_batch(batch, transductive=False)
    assert torch.equal(a, algo.evaluate_batch(batch, transductive=True))  # every task starts from the same state
    assert a.shape == b.shape == (TASKS,)
    assert algo.adam_state.t == before.t and all(torch.equal(algo.adam_state.v[n], before.v[n]) for n in before.v)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_reptile_minibatch_indices_cover_each_example_once_per_pass():
    """OpenAI's _mini_batches without replacement: batches of b cut from permutations laid end to end,
    so each run of n consecutive draws (aligned to n) holds every example once; the stream is fixed
    by the generator's seed and differs between seeds."""
    from metalearn.algorithms.reptile import minibatch_indices

    batches = minibatch_indices(10, 4, 7, torch.Generator().manual_seed(3))  # 28 draws: 2 passes and 8
    assert [len(b) for b in batches] == [4] * 7
    stream = torch.cat(batches)
    for k in range(2):
        assert sorted(stream[10 * k:10 * (k + 1)].tolist()) == list(range(10))
    assert len(set(stream[20:].tolist())) == 8  # the third pass has no repeats either
    again = minibatch_indices(10, 4, 7, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = minibatch_indices(10, 4, 7, torch.Generator().manual_seed(4))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    assert [len(b) for b in minibatch_indices(50, 10, 5, torch.Generator())] == [10] * 5


def test_reptile_inner_minibatches_equal_hand_computed_adam_on_those_batches():
    """With inner_batch_size = b < support size, inner step j of task i is torch.optim.Adam on the
    support examples of the j-th index batch drawn (task after task) from the algorithm's generator;
    b >= the support size is bitwise the full-batch algorithm; resuming from state_dict continues the
    same stream."""
    from metalearn.algorithms import Reptile
    from metalearn.algorithms.reptile import minibatch_indices

    steps, b, seed = 3, 4, 11
    model = make_model(batchnorm=False)
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2, betas=(0.0, 0.999))
    algo = Reptile(model, inner_lr=1e-2, inner_steps=steps, inner_batch_size=b, seed=seed)
    opt = algo.outer_optimizer(model.parameters(), lr=1.0)
    batch = make_batch(seed=5)
    n = batch.support.x.shape[1]
    assert b < n
    g = torch.Generator().manual_seed(seed)
    theta = {k: p.detach().clone() for k, p in ref_model.named_parameters()}
    phis, seen = [], set()
    for t in range(TASKS):
        with torch.no_grad():
            for k, p in ref_model.named_parameters():
                p.copy_(theta[k])
        for idx in minibatch_indices(n, b, steps, g):
            seen.add(tuple(idx.tolist()))
            ref_opt.zero_grad()
            F.cross_entropy(ref_model(batch.support.x[t][idx]), batch.support.y[t][idx]).backward()
            ref_opt.step()
        phis.append({k: p.detach().clone() for k, p in ref_model.named_parameters()})
    assert len(seen) > 1  # the batches differ, so the test tells mini-batches from full batches
    expected = {k: theta[k] + (sum(phi[k] for phi in phis) / TASKS - theta[k]) for k in theta}
    saved = algo.state_dict()
    algo.schedule(1, 10, opt)
    model.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    opt.step()
    assert_close(dict(model.named_parameters()), expected, rtol=1e-12)
    assert algo.adam_state.t == steps * TASKS

    # resuming from the saved state draws the same batches again
    resumed = Reptile(make_model(batchnorm=False), inner_lr=1e-2, inner_steps=steps, inner_batch_size=b, seed=0)
    resumed.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(resumed.inner_batches(n), minibatch_indices(n, b, steps,
                                                 torch.Generator().manual_seed(seed))))

    # b >= n: the full-batch algorithm, bitwise
    full, big = (Reptile(make_model(batchnorm=False), inner_lr=1e-2, inner_steps=steps, inner_batch_size=bs)
                 for bs in (0, n))
    for algo_ in (full, big):
        algo_.outer_optimizer(algo_.model.parameters(), lr=1.0)
        algo_.meta_step(batch)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(full.model.parameters(), big.model.parameters()))


# --- ProtoNet -------------------------------------------------------------------------------
def test_protonet_gradient_matches_reference():
    from metalearn.algorithms import ProtoNet
    from reference import protonet_gradient

    model, batch = make_model(), make_batch()
    algo = ProtoNet(model)
    got = grads_of(algo, batch)
    ref = protonet_gradient(dict(model.named_parameters()), batch)
    assert_close({n: got[n] for n in ref}, ref)
    assert all(got[n].abs().max() == 0 for n in HEAD)  # the head is unused


def test_protonet_scores_any_number_of_ways():
    from metalearn.algorithms import ProtoNet
    from metalearn.types import Examples, TaskBatch

    model = make_model()  # built with a 5-way head
    g = torch.Generator().manual_seed(0)
    ways = 3
    sx = torch.rand(2, ways * 2, 1, 28, 28, generator=g, dtype=torch.float64)
    qx = torch.rand(2, ways * 4, 1, 28, 28, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(2).expand(2, -1)
    qy = torch.arange(ways).repeat_interleave(4).expand(2, -1)
    acc = ProtoNet(model).evaluate_batch(TaskBatch(Examples(sx, sy), Examples(qx, qy), ways, 2, 4))
    assert acc.shape == (2,) and ((acc >= 0) & (acc <= 1)).all()



# --- the engine around an algorithm with its own per-task step ------------------------------------
@pytest.mark.parametrize("name", ["reptile", "protonet"])
def test_engine_runs_reptile_and_protonet_per_task_and_its_plan_says_so(name):
    """Engine(algo) runs the algorithm's own meta_step / evaluate_batch, one task at a time, whatever
    the execution setting: the same gradients, state and scores as the algorithm called directly."""
    from metalearn.algorithms import ProtoNet, Reptile
    from metalearn.engine import EXECUTIONS

    cls = {"reptile": Reptile, "protonet": ProtoNet}[name]
    make = lambda m: Reptile(m, inner_lr=1e-3, inner_steps=2) if name == "reptile" else ProtoNet(m)  # noqa: E731
    for execution in EXECUTIONS:
        assert Engine(make(make_model()), execution).plan() == ("loop", f"{cls.__name__} runs its own per-task step")
    batch = make_batch()
    direct_model, engine_model = make_model(), make_model()
    direct, engine = make(direct_model), Engine(make(engine_model), "batched")
    sizes = []  # the batch size of every forward of the model (Reptile) or its body (ProtoNet)
    hooked = engine_model if name == "reptile" else engine_model.features
    h = hooked.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    metrics = []
    try:
        for algo in (direct, engine):
            algo.outer_optimizer(algo.model.parameters(), 1.0)
            metrics.append(algo.meta_step(batch))
    finally:
        h.remove()
    per_task = {batch.support.x.shape[1], batch.query.x.shape[1]}
    assert set(sizes) <= per_task  # never a forward over several tasks at once
    assert len(sizes) == TASKS * (2 + 1 if name == "reptile" else 2)  # Reptile: 2 inner steps + the query
    for (n, p), q in zip(direct_model.named_parameters(), engine_model.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), n
    if name == "reptile":
        assert engine.adam_state.t == direct.adam_state.t == 2 * TASKS
    assert metrics[0] == metrics[1] and metrics[1].keys() == {"loss", "accuracy"}
    for transductive in (True, False):
        assert torch.equal(engine.evaluate_batch(batch, steps=3, lr=1e-3, transductive=transductive),
                           direct.evaluate_batch(batch, steps=3, lr=1e-3, transductive=transductive))

# --- MAML++ ---------------------------------------------------------------------------------
def make_perstep_model(seed=0):
    from metalearn.models.conv4_perstep import Conv4PerStep

    torch.manual_seed(seed)
    m = Conv4PerStep(hidden=8, num_classes=5, steps=STEPS).double()
    with torch.no_grad():  # per-step BatchNorm rows that differ from each other
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def mamlpp(model, *, first_order=False, msl_iterations=0, first_order_until=0):
    from metalearn.algorithms import MAMLPlusPlus

    algo = MAMLPlusPlus(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order, msl_iterations=msl_iterations,
                        first_order_until=first_order_until)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in algo.lrs.parameters():
            p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))
    return Engine(algo)


@pytest.mark.parametrize("msl", [False, True], ids=["final", "msl"])
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_mamlpp_matches_reference_with_per_step_bn_and_lrs(first_order, msl):
    from metalearn.algorithms.mamlpp import msl_weights
    from reference import conv4_forward_step

    model, batch = make_perstep_model(), make_batch()
    algo = mamlpp(model, first_order=first_order, msl_iterations=10 if msl else 0)
    opt = algo.outer_optimizer(model.parameters(), 1e-3)
    algo.schedule(4, 20, opt)  # outer step 4: MSL weights mid-annealing
    weights = msl_weights(STEPS, 4, 10) if msl else None
    assert (weights is not None) == msl
    got = grads_of(algo, batch)
    ref_w, ref_lr = general_meta_gradient(dict(model.named_parameters()), batch, steps=STEPS, first_order=first_order,
                                          lrs=algo.lrs.by_name(), step_weights=weights, forward=conv4_forward_step)
    assert_close(got, ref_w)
    assert_close({n: a.grad for n, a in algo.lrs.by_name().items()}, ref_lr)


def test_mamlpp_schedules():
    from metalearn.algorithms.mamlpp import msl_weights

    # MSL: uniform at the first step, final-step-heavy later, final-step only after msl_iterations
    assert msl_weights(5, 1, 100) == pytest.approx([0.2] * 5)
    w = msl_weights(5, 51, 100)
    assert w[:4] == pytest.approx([0.2 - 50 / 500] * 4) and w[4] == pytest.approx(0.2 + 50 * 4 / 500)
    assert msl_weights(5, 100, 100)[:4] == pytest.approx([0.03 / 5] * 4)  # floor
    assert msl_weights(5, 101, 100) is None
    # derivative-order annealing and cosine outer lr
    model = make_perstep_model()
    algo = mamlpp(model, first_order_until=3)
    opt = algo.outer_optimizer(model.parameters(), 1e-3)
    algo.schedule(3, 10, opt)
    assert algo.current_first_order()
    algo.schedule(4, 10, opt)
    assert not algo.current_first_order()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 3 / 10)))
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in algo.lrs.parameters())


def test_mamlpp_first_order_phase_equals_fomaml_style_gradient():
    """During derivative-order annealing the meta-gradient is the first-order one."""
    model, batch = make_perstep_model(), make_batch()
    a = mamlpp(model, first_order_until=5)
    a.schedule(2, 10, a.outer_optimizer(model.parameters(), 1e-3))
    b = mamlpp(model, first_order=True)
    b.schedule(2, 10, b.outer_optimizer(model.parameters(), 1e-3))
    assert_close(grads_of(a, batch), grads_of(b, batch), rtol=0)


def test_per_step_bn_running_stats_are_per_step_and_used_inductively():
    model, batch = make_perstep_model(), make_batch()
    algo = mamlpp(model)
    algo.meta_step(batch)
    rm = model.features[0].norm.running_mean
    assert not torch.equal(rm[0], rm[1])  # one row per step, each updated by its own step's batches
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc_run = algo.evaluate_batch(batch, transductive=False)
    acc_tr = algo.evaluate_batch(batch, transductive=True)
    assert acc_run.shape == acc_tr.shape == (TASKS,)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # evaluation changes nothing


# --- regression (sinusoid, MSE) -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "anil"])
def test_sinusoid_mse_meta_gradient_matches_reference(name):
    """MAML's sinusoid setting (Sec. 5.1): MLP 1-40-40-1, K = 10, MSE loss; metrics report "mse"."""
    from metalearn.data.sinusoid import SinusoidSampler
    from metalearn.models import MLP

    torch.manual_seed(0)
    model = MLP().double()
    batch = SinusoidSampler(10, 10, seed=0, dtype=torch.float64).sample(TASKS)
    fo = name == "fomaml"
    algo = Engine({"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "anil": ANIL}[name](
        model, inner_lr=0.01, inner_steps=STEPS, first_order=fo, loss="mse"))
    algo.model.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    assert set(metrics) == {"loss", "mse"} and metrics["loss"] == metrics["mse"]
    got = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}

    def mlp(w, x, s):  # independent functional MLP
        h = F.relu(x @ w["features.0.weight"].t() + w["features.0.bias"])
        h = F.relu(h @ w["features.2.weight"].t() + w["features.2.bias"])
        return h @ w["head.weight"].t() + w["head.bias"]

    w0 = dict(model.named_parameters())
    if name == "metasgd":
        lrs = algo.alpha.by_name()
    else:
        lrs = {n: torch.tensor(0.01, dtype=torch.float64) for n in algo.adapt}
    ref, _ = general_meta_gradient(w0, batch, steps=STEPS, first_order=fo, adapt=algo.adapt, lrs=lrs, forward=mlp,
                                   loss=F.mse_loss)
    assert_close(got, ref)
    mse = algo.evaluate_batch(batch, steps=1, lr=0.01)
    assert mse.shape == (TASKS,) and (mse > 0).all()
