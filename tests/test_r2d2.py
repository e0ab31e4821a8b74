"""R2-D2 / MetaOptNet-RR (metalearn/algorithms/r2d2.py): the closed-form ridge head against least-squares references,
the meta-gradient against central finite differences of an independent float64 forward, a short learning run on
real Omniglot, configuration and checkpoint state, and test ways that differ from training ways."""
import math

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import ALGORITHMS, R2D2
from metalearn.algorithms.r2d2 import ridge_form, ridge_logits, ridge_solution
from metalearn.config import DataConfig, load_config, to_dict
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.models import Conv4
from metalearn.train import build_algorithm
from metalearn.types import Examples, TaskBatch


@pytest.fixture(autouse=True)
def one_thread():
    """Every test here runs many tiny operations (the finite differences: ~600 forwards of a 3-filter conv4): on a
    loaded 2-core machine a second intra-op thread made each forward 50x slower (measured 0.9 s against 16 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def ridge_lstsq(z: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge regression as the least-squares problem [Z; sqrt(lam) I] W ~ [Y; 0] (an independent reference)."""
    d = z.shape[1]
    a = torch.cat([z, math.sqrt(lam) * torch.eye(d, dtype=z.dtype)])
    b = torch.cat([y, torch.zeros(d, y.shape[1], dtype=z.dtype)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


# --- (1) the head's solution ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,form", [(6, 17, "woodbury"), (25, 9, "primal"), (9, 9, "primal")])
def test_ridge_solution_matches_lstsq_and_normal_equations(n, d, form):
    g = torch.Generator().manual_seed(n * d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = F.one_hot(torch.arange(n) % 4, 4).double()
    lam = 0.37
    assert ridge_form(n, d) == form  # the form this case is meant to exercise
    w = ridge_solution(z, y, torch.tensor(lam, dtype=torch.float64))
    normal = torch.linalg.inv(z.T @ z + lam * torch.eye(d, dtype=z.dtype)) @ z.T @ y  # d x d, whatever n is
    woodbury = z.T @ torch.linalg.inv(z @ z.T + lam * torch.eye(n, dtype=z.dtype)) @ y  # n x n
    for ref in (ridge_lstsq(z, y, lam), normal, woodbury):
        assert rel(w, ref) <= 1e-10
    # not vacuous: a different lam gives a clearly different W
    assert rel(ridge_solution(z, y, 2 * lam), w) > 1e-3


def test_r2d2_head_is_the_codes_scaled_ridge_with_a_bias_column():
    """head r2d2: R2-D2's code appends a column of ones and divides Z_S and Y by sqrt(n) before the ridge with lam:
    the same logits as the ridge on [Z, 1] with n * lam. metaoptnet_rr: plain Z (the algorithm fixes beta at 0)."""
    g = torch.Generator().manual_seed(1)
    n, d, ways, lam, alpha, beta = 10, 7, 5, 0.8, 3.0, 0.25
    zs, zq = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(12, d, generator=g, dtype=torch.float64)
    ys = torch.arange(n) % ways
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = ridge_logits(zs, ys, zq, ways, lam=t(lam), alpha=t(alpha), beta=t(beta), head="r2d2")
    xs = torch.cat([zs, torch.ones(n, 1, dtype=zs.dtype)], 1) / math.sqrt(n)
    wb = ridge_lstsq(xs, F.one_hot(ys, ways).double() / math.sqrt(n), lam)
    ref = alpha * (zq @ wb[:d] + wb[d:]) + beta
    assert rel(got, ref) <= 1e-10
    rr = ridge_logits(zs, ys, zq, ways, lam=t(lam), alpha=t(alpha), beta=t(beta), head="metaoptnet_rr")
    assert rel(rr, alpha * zq @ ridge_lstsq(zs, F.one_hot(ys, ways).double(), lam) + beta) <= 1e-10
    assert rel(rr, got) > 1e-2


# --- (2) the meta-gradient against finite differences ----------------------------------------------------------------

def tiny_model(seed: int = 0) -> Conv4:
    """conv4 with 3 filters on 32x32 images: 12 features (so n < d and n >= d are both reachable with a few
    examples), BatchNorm with non-trivial affine parameters; 306 body parameters."""
    torch.manual_seed(seed)
    m = Conv4(hidden=3, num_classes=3, image_size=32).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m


def random_batch(ways: int, shots: int, query: int, tasks: int = 2, seed: int = 0, size: int = 32) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64)
    qx = torch.rand(tasks, ways * query, 1, size, size, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    qy = torch.arange(ways).repeat_interleave(query).expand(tasks, -1)
    return TaskBatch(Examples(sx, sy), Examples(qx, qy), ways, shots, query)


def reference_loss(model: Conv4, alpha: float, beta: float, lam: float, batch: TaskBatch, head: str) -> float:
    """(1/T) sum_t CE of the query logits, written independently: the module's own forward (NCHW), the ridge as a
    least-squares problem (torch.linalg.lstsq), R2-D2's code's scaling by 1/sqrt(n) spelled out."""
    total = 0.0
    for t in range(batch.num_tasks):
        zs, zq = model.features(batch.support.x[t]).flatten(1), model.features(batch.query.x[t]).flatten(1)
        y = F.one_hot(batch.support.y[t], batch.ways).double()
        if head == "r2d2":
            n = len(zs)
            zs = torch.cat([zs, torch.ones(n, 1, dtype=zs.dtype)], 1) / math.sqrt(n)
            zq = torch.cat([zq, torch.ones(len(zq), 1, dtype=zq.dtype)], 1)
            y = y / math.sqrt(n)
        logits = alpha * zq @ ridge_lstsq(zs, y, lam) + beta
        total += F.cross_entropy(logits, batch.query.y[t]).item() / batch.num_tasks
    return total


@pytest.mark.parametrize("head,ways,shots,tasks,form", [("r2d2", 3, 2, 2, "woodbury"),
                                                        ("metaoptnet_rr", 3, 4, 1, "primal")])
def test_meta_gradient_matches_central_finite_differences(head, ways, shots, tasks, form):
    """Every body parameter, alpha, beta and log lam, perturbed one at a time by +-1e-6 in an independent forward
    (reference_loss). Measured relative L2 errors: 5.5e-10 (r2d2, Woodbury, 2 tasks) and 6.1e-10 (metaoptnet_rr,
    primal, 1 task)."""
    model = tiny_model()
    algo = R2D2(model, head=head, lam=0.6, learn_lam=True, scale=2.5)
    if head == "r2d2":
        with torch.no_grad():
            algo.beta.fill_(0.3)
    batch = random_batch(ways, shots, query=2, tasks=tasks)
    d = model.features(batch.support.x[0]).flatten(1).shape[1] + (head == "r2d2")  # + R2-D2's bias column
    assert d == (13 if head == "r2d2" else 12) and ridge_form(ways * shots, d) == form
    model.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    assert metrics["loss"] == pytest.approx(reference_loss(model, algo.alpha.item(), algo.beta.item(),
                                                           algo.lam.item(), batch, head), rel=1e-12)
    body = {n: p for n, p in model.named_parameters() if n.startswith("features.")}
    assert model.head.weight.grad is None  # the model's own head takes no part
    learn = {"alpha": algo.alpha, "beta": algo.beta, "log_lam": algo.log_lam}
    assert algo.meta_parameters() == ([algo.alpha, algo.beta, algo.log_lam] if head == "r2d2"
                                      else [algo.alpha, algo.log_lam])
    grads = {**{n: p.grad.clone() for n, p in body.items()},
             **{k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in learn.items()}}

    def loss() -> float:
        return reference_loss(model, algo.alpha.item(), algo.beta.item(), algo.log_lam.exp().item(), batch, head)

    eps, fd = 1e-6, {}
    with torch.no_grad():
        for name, p in {**body, **learn}.items():
            g = torch.zeros_like(p).flatten()
            flat = p.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + eps
                up = loss()
                flat[j] = old - eps
                down = loss()
                flat[j] = old
                g[j] = (up - down) / (2 * eps)
            fd[name] = g.view_as(p)
    va, vb = torch.cat([grads[k].flatten() for k in fd]), torch.cat([fd[k].flatten() for k in fd])
    err = rel(va, vb)
    print(f"\n{head} {ways}-way {shots}-shot ({form}): meta-gradient vs central differences, relative L2 {err:.2e}")
    assert err <= 1e-6
    # not vacuous: the gradient reaches the body, alpha and lam (beta's is exactly zero: it cancels in the softmax)
    assert all(grads[k].abs().max() > 1e-6 for k in ("features.0.conv.weight", "alpha", "log_lam"))
    assert grads["beta"].abs().max() < 1e-12 and fd["beta"].abs().max() < 1e-8


def test_woodbury_and_primal_give_the_same_meta_gradient():
    """n < d takes the Woodbury system and n >= d the primal; on one problem both must give the same gradient.
    Forced by evaluating the same task with ridge_form patched both ways."""
    import metalearn.algorithms.r2d2 as mod

    batch = random_batch(3, 2, query=3, tasks=1)
    out = {}
    for form in ("woodbury", "primal"):
        model = tiny_model()
        algo = R2D2(model, lam=0.6, scale=2.5)
        orig = mod.ridge_form
        mod.ridge_form = lambda n, d, f=form: f
        try:
            algo.meta_step(batch)
        finally:
            mod.ridge_form = orig
        out[form] = torch.cat([p.grad.flatten() for p in [*model.features.parameters(), algo.alpha, algo.log_lam]])
    assert rel(out["woodbury"], out["primal"]) <= 1e-10


# --- (3) learning on real Omniglot -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def omniglot_splits(data_root, cache_dir):
    from metalearn.data import open_dataset

    cfg = DataConfig(dataset="omniglot", root=str(data_root / "omniglot"), cache_dir=str(cache_dir))
    ds, splits = open_dataset(cfg)
    return {k: ds.images[v] for k, v in splits.items()}


@pytest.mark.slow
def test_short_run_improves_on_omniglot(omniglot_splits):
    """As tests/test_algorithms_learning.py: conv4 with 16 filters (16 features: 5-way 1-shot takes the Woodbury
    form), 40 outer steps of 4 tasks (2 query examples per class), Adam 3e-3, head r2d2 with the preset's lam 1 (per
    support example, learned) and scale 10; 50 fixed 5-way 1-shot TEST episodes (5 queries per class), before and
    after. Measured (CPU, seed 0, one thread): 45.8% untrained -> 71.6% (training loss 1.46 -> 0.63); floor 0.60 and
    +8 points over the untrained network. Probes of the same run: lam 50 (R2-D2's code, for its 3584 features) 34.6
    -> 54.1% (the penalty swamps 16 features); lam 1, scale 1: 69.3%; metaoptnet_rr lam 1, scale 2: 69.8%."""
    from metalearn.data import EpisodeSampler
    from metalearn.evaluation import evaluate

    torch.manual_seed(0)
    model = Conv4(hidden=16, num_classes=5)
    algo = Engine(R2D2(model, lam=1.0, scale=10.0))
    acc = lambda: evaluate(algo, omniglot_splits["test"], ways=5, shots=1, query_shots=5, episodes=50,  # noqa: E731
                           seed=0, batch_size=50, inner_steps=0, inner_lr=0.0).mean
    before = acc()
    opt = algo.outer_optimizer(model.parameters(), 3e-3)
    sampler = EpisodeSampler(omniglot_splits["train"], 5, 1, 2, seed=0, split="train")
    lam0 = algo.lam.item()
    for step in range(1, 41):
        model.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        algo.schedule(step, 40, opt)
        algo.meta_step(sampler.sample(4))
        opt.step()
    after = acc()
    print(f"\nr2d2: test accuracy {100 * before:.1f}% untrained -> {100 * after:.1f}% after 40 steps; "
          f"alpha {algo.alpha.item():.3f}, lam {lam0:g} -> {algo.lam.item():.3f}")
    assert after >= before + 0.08 and after >= 0.60, (before, after)
    assert algo.lam.item() != lam0  # lam is trained by the outer optimiser


# --- (4) registry, configuration, state ------------------------------------------------------------------------------

def test_registry_and_from_config():
    assert ALGORITHMS["r2d2"] is R2D2
    caps = R2D2.capabilities
    assert not caps.inner_loop and caps.test_ways_may_differ and not caps.regression
    model = Conv4(hidden=8)
    algo = build_algorithm(load_config(None, ["outer.algorithm=r2d2"]), model)
    assert isinstance(algo, Engine) and isinstance(algo.algorithm, R2D2)
    assert algo.head == "r2d2" and algo.lam.item() == pytest.approx(1.0) and algo.alpha.item() == 1.0
    assert algo.meta_parameters() == [algo.alpha, algo.beta, algo.log_lam]
    assert algo.plan()[0] == "loop" and not algo.has_inner_loop
    rr = build_algorithm(load_config(None, ["outer.algorithm=r2d2", "r2d2.head=metaoptnet_rr", "r2d2.lam=50",
                                            "r2d2.learn_lam=false", "r2d2.scale=2", "outer.lr_halve_every=100"]),
                         model)
    assert rr.head == "metaoptnet_rr" and rr.lam.item() == pytest.approx(50.0) and rr.alpha.item() == 2.0
    assert rr.meta_parameters() == [rr.alpha] and rr.lr_halve_every == 100
    opt = rr.outer_optimizer(model.parameters(), 1e-3)
    assert any(p is rr.alpha for p in opt.param_groups[0]["params"])


def test_bad_settings_are_one_line_errors():
    with pytest.raises(MetalearnError, match="r2d2.head"):
        load_config(None, ["outer.algorithm=r2d2", "r2d2.head=svm"])
    model = Conv4(hidden=8)
    for bad, match in [("r2d2.lam=0", "r2d2.lam must be a finite number > 0"),
                       ("r2d2.lam=-1.5", "r2d2.lam must be a finite number > 0")]:
        with pytest.raises(MetalearnError, match=match):
            build_algorithm(load_config(None, ["outer.algorithm=r2d2", bad]), model)
    with pytest.raises(MetalearnError, match="r2d2.scale must be a finite number"):
        R2D2(model, scale=float("nan"))
    with pytest.raises(MetalearnError, match="needs a model with a `features` submodule"):
        R2D2(torch.nn.Linear(4, 2))
    with pytest.raises(MetalearnError, match="r2d2 classifies"):
        R2D2(model, loss="mse")
    with pytest.raises(MetalearnError, match="outer.algorithm=r2d2 is for classification"):
        load_config(None, ["outer.algorithm=r2d2", "data.dataset=sinusoid", "model.name=mlp", "data.ways=1"])


def test_state_round_trips_through_a_checkpoint(tmp_path):
    from metalearn.checkpoint import load_checkpoint, save_checkpoint

    batch = random_batch(3, 2, query=2)
    model = tiny_model()
    algo = R2D2(model, lam=0.5, scale=2.0)
    opt = algo.outer_optimizer(model.parameters(), 0.05)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        algo.meta_step(batch)
        opt.step()
    state = algo.state_dict()
    assert set(state) == {"alpha", "beta", "log_lam"}
    assert state["alpha"].item() != 2.0 and state["log_lam"].item() != pytest.approx(math.log(0.5))  # trained
    path = save_checkpoint(tmp_path / "c.pt", step=3, config=to_dict(load_config(None, ["outer.algorithm=r2d2"])),
                           model=model.state_dict(), algorithm=state)
    ckpt = load_checkpoint(path)  # weights_only=True
    fresh_model = tiny_model(seed=1)
    fresh_model.load_state_dict(ckpt["model"])
    fresh = R2D2(fresh_model, lam=0.5, scale=2.0)
    fresh.load_state_dict(ckpt["algorithm"])
    for k in state:
        assert torch.equal(fresh.state_dict()[k], state[k])
    assert torch.equal(fresh.evaluate_batch(batch), algo.evaluate_batch(batch))
    with pytest.raises(MetalearnError, match="r2d2 state: expected keys"):
        fresh.load_state_dict({"alpha": state["alpha"]})


# --- (5) test ways that differ from training ways ---------------------------------------------------------------------

def test_eval_ways_may_differ_from_training_ways():
    cfg = load_config(None, ["outer.algorithm=r2d2", "data.ways=10", "eval.ways=3"])  # allowed by the capability
    torch.manual_seed(0)
    model = Conv4(hidden=8).double()
    algo = build_algorithm(cfg, model)
    opt = algo.outer_optimizer(model.parameters(), 1e-3)
    metrics = algo.meta_step(random_batch(10, 1, query=1, tasks=1, size=28))  # 10-way training task
    opt.step()
    assert math.isfinite(metrics["loss"])
    batch = random_batch(3, 2, query=4, tasks=2, seed=5, size=28)  # 3-way evaluation tasks
    for transductive in (True, False):
        acc = algo.evaluate_batch(batch, transductive=transductive)
        assert acc.shape == (2,) and acc.dtype == torch.float64
    # the 3-way accuracy is the independent reference's (module forward, lstsq ridge)
    with torch.no_grad():
        for t in range(2):
            zs, zq = model.features(batch.support.x[t]).flatten(1), model.features(batch.query.x[t]).flatten(1)
            n = len(zs)
            w = ridge_lstsq(torch.cat([zs, torch.ones(n, 1, dtype=zs.dtype)], 1) / math.sqrt(n),
                            F.one_hot(batch.support.y[t], 3).double() / math.sqrt(n), algo.lam.item())
            logits = zq @ w[:-1] + w[-1:]
            assert logits.shape == (12, 3)
            ref = (logits.argmax(1) == batch.query.y[t]).double().mean()
            assert algo.evaluate_batch(batch)[t].item() == pytest.approx(ref.item())
