"""CAVIA (metalearn/algorithms/cavia.py): the meta-gradient against an independent float64 reference (plain
torch.autograd per task, the context concatenated or FiLM-ed as the authors' code writes it), the context's
life cycle (zero at every task's start, adapted alone, never seen by the outer optimiser), learning on the
sinusoid (through the CLI, with `metalearn eval` of the checkpoint) and on real Omniglot, exact resume, and
the config surface."""
import json

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import CAVIA, registry
from metalearn.cli import main
from metalearn.config import DataConfig, load_config
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.models import MLP, Conv4, Conv4PerStep
from metalearn.train import build_algorithm
from metalearn.types import Examples, TaskBatch

TASKS, WAYS, SHOTS, QUERY, LR, CTX, SIDE = 2, 5, 1, 3, 0.5, 6, 16


# --- an independent reference: the networks as the authors' code writes them, one task at a time ---------

def conv4_features(w, x, block=None, ctx=None):
    """conv, BatchNorm (batch statistics), max-pool, FiLM at `block` (gamma * h + beta), ReLU; flattened."""
    for i in range(4):
        x = F.conv2d(x, w[f"features.{i}.conv.weight"], w[f"features.{i}.conv.bias"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5)
        x = x * w[f"features.{i}.norm.weight"].view(1, -1, 1, 1) + w[f"features.{i}.norm.bias"].view(1, -1, 1, 1)
        x = F.max_pool2d(x, 2)
        if i == block:
            film = w["film.weight"] @ ctx + w["film.bias"]
            c = x.shape[1]
            x = film[:c].view(1, -1, 1, 1) * x + film[c:].view(1, -1, 1, 1)
        x = F.relu(x)
    return x.flatten(1)


def film_conv4(w, ctx, x, block):
    """The code's CondConvNet with the FiLM layer at `block`."""
    return conv4_features(w, x, block, ctx) @ w["head.weight"].t() + w["head.bias"]


def head_concat_conv4(w, ctx, x):
    """The code's context_in[4]: the head applied to cat(features, context)."""
    z = torch.cat([conv4_features(w, x), ctx.expand(x.shape[0], -1)], 1)
    return z @ torch.cat([w["head.weight"], w["context_in.weight"]], 1).t() + w["head.bias"]


def concat_mlp(w, ctx, x):
    """The code's CaviaModel: the first layer applied to cat(x, context)."""
    h = torch.cat([x, ctx.expand(x.shape[0], -1)], 1)
    h = F.relu(h @ torch.cat([w["features.0.weight"], w["context_in.weight"]], 1).t() + w["features.0.bias"])
    h = F.relu(h @ w["features.2.weight"].t() + w["features.2.bias"])
    return h @ w["head.weight"].t() + w["head.bias"]


def cavia_meta_gradient(w0, batch, fwd, *, lr, steps, first_order, loss=F.cross_entropy):
    """d/dw0 of (1/T) sum_t L_query(w0, ctx_t), ctx_t = `steps` SGD steps from zero on task t's support loss."""
    w0 = {k: v.detach().clone().requires_grad_(True) for k, v in w0.items()}
    total = 0.0
    for t in range(batch.support.x.shape[0]):
        ctx = torch.zeros(CTX, dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            inner = loss(fwd(w0, ctx, batch.support.x[t]), batch.support.y[t])
            (g,) = torch.autograd.grad(inner, ctx, create_graph=not first_order)
            ctx = ctx - lr * (g.detach() if first_order else g)
        total = total + loss(fwd(w0, ctx, batch.query.x[t]), batch.query.y[t])
    grads = torch.autograd.grad(total / batch.support.x.shape[0], list(w0.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(w0.items(), grads)}


# --- helpers ---------------------------------------------------------------------------------------

def image_batch(seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(TASKS, WAYS * SHOTS, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    qx = torch.rand(TASKS, WAYS * QUERY, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1)
    qy = torch.arange(WAYS).repeat_interleave(QUERY).expand(TASKS, -1)
    return TaskBatch(Examples(sx, sy), Examples(qx, qy), WAYS, SHOTS, QUERY)


def sine_batch(seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    amp, phase = 0.1 + 4.9 * torch.rand(TASKS, 1, 1, generator=g), 3.14 * torch.rand(TASKS, 1, 1, generator=g)
    xs, xq = (10 * torch.rand(TASKS, 10, 1, generator=g) - 5 for _ in range(2))
    f = lambda x: amp * torch.sin(x - phase)  # noqa: E731
    return TaskBatch(Examples(xs.double(), f(xs).double()), Examples(xq.double(), f(xq).double()), 1, 10, 10)


def conv_model(seed=0) -> Conv4:
    torch.manual_seed(seed)
    m = Conv4(hidden=8, num_classes=WAYS, image_size=SIDE).double()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def meta_gradient(algo, batch) -> dict:
    """The meta-gradient the engine accumulates over one meta-batch, by name (model and conditioning layer)."""
    params = algo.params()
    for p in params.values():
        p.grad = None
    Engine(algo).meta_step(batch)
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()}


def rel_l2(a: dict, b: dict) -> float:
    """Global relative L2 error over all parameters."""
    assert a.keys() == b.keys()
    va, vb = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
    return ((va - vb).norm() / vb.norm()).item()


# --- (1) the meta-gradient -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_film_meta_gradient_matches_reference(first_order, steps):
    block = 1 if steps == 1 else 3  # FiLM inside the body and right before the head
    algo = CAVIA(conv_model(), inner_lr=LR, inner_steps=steps, first_order=first_order, context_dim=CTX,
                 film_block=block)
    batch = image_batch()
    ours = meta_gradient(algo, batch)
    ref = cavia_meta_gradient(algo.params(), batch, lambda w, c, x: film_conv4(w, c, x, block), lr=LR, steps=steps,
                              first_order=first_order)
    assert rel_l2(ours, ref) <= 1e-10
    assert ours["film.weight"].norm() > 1e-3 and ours["features.0.conv.weight"].norm() > 1e-3  # not vacuous


def test_second_and_first_order_differ():
    """Guards the comparison above: the two orders give clearly different meta-gradients."""
    batch = image_batch()
    so, fo = (meta_gradient(CAVIA(conv_model(), inner_lr=LR, inner_steps=2, first_order=f, context_dim=CTX,
                                  film_block=1), batch) for f in (False, True))
    assert rel_l2(so, fo) > 1e-2


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_concat_mlp_meta_gradient_matches_reference(first_order):
    torch.manual_seed(0)
    algo = CAVIA(MLP().double(), inner_lr=LR, inner_steps=2, first_order=first_order, context_dim=CTX, loss="mse")
    batch = sine_batch()
    ours = meta_gradient(algo, batch)
    ref = cavia_meta_gradient(algo.params(), batch, concat_mlp, lr=LR, steps=2, first_order=first_order,
                              loss=F.mse_loss)
    assert rel_l2(ours, ref) <= 1e-10 and ours["context_in.weight"].norm() > 1e-3


def test_head_concat_and_inner_checkpoint_match_reference():
    """cavia.film=false (the context concatenated before the head) and inner.checkpoint (recomputed inner steps)."""
    batch = image_batch()
    algo = CAVIA(conv_model(), inner_lr=LR, inner_steps=2, context_dim=CTX, film=False)
    ours = meta_gradient(algo, batch)
    ref = cavia_meta_gradient(algo.params(), batch, head_concat_conv4, lr=LR, steps=2, first_order=False)
    assert rel_l2(ours, ref) <= 1e-10 and ours["context_in.weight"].norm() > 1e-3

    film = CAVIA(conv_model(), inner_lr=LR, inner_steps=2, context_dim=CTX, film_block=2)
    plain = meta_gradient(film, batch)
    checkpointed = meta_gradient(film.set_checkpoint(True), batch)
    assert rel_l2(checkpointed, plain) <= 1e-12


# --- (2) the context: zero at every task's start, adapted alone, never trained by the outer loop -------------

def spy(algo):
    """Record (batch size, context, the other params) of every forward the engine runs."""
    seen, forward_fn = [], algo.forward_fn

    def recording(params, x, step):
        seen.append((x.shape[0], params["context"].detach().clone(), {n: p for n, p in params.items()
                                                                        if n != "context"}))
        return forward_fn(params, x, step)

    algo.forward_fn = recording
    return seen


def test_context_starts_at_zero_for_every_task_and_is_never_trained():
    model = conv_model()
    algo = CAVIA(model, inner_lr=LR, inner_steps=2, context_dim=CTX)
    engine = Engine(algo)
    assert algo.adapt == ["context"]
    opt = engine.outer_optimizer(model.parameters(), 1e-2)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in algo.params().values()}  # the model and the FiLM layer, nothing else
    assert "context" not in model.state_dict() and set(algo.state_dict()) == {"conditioning"}
    seen = spy(algo)
    batch = image_batch()
    for _ in range(2):  # two outer steps: every task of both starts from zero
        opt.zero_grad(set_to_none=True)
        engine.meta_step(batch)
        opt.step()
    engine.evaluate_batch(batch, steps=2)  # and every evaluation task
    assert len(seen) == 3 * TASKS * 3  # per task: 2 support forwards, then the query
    theta = algo.params()
    for t in range(3 * TASKS):
        (n0, c0, _), (_, c1, _), (nq, cq, rest) = seen[3 * t:3 * t + 3]
        assert n0 == WAYS * SHOTS and nq == WAYS * QUERY
        assert torch.equal(c0, torch.zeros(CTX, dtype=torch.float64))
        assert c1.abs().max() > 1e-6 and not torch.equal(c1, cq)  # the inner loop moves the context ...
        if t >= 2 * TASKS:  # ... and nothing else (evaluation: the current, detached parameters)
            assert all(torch.equal(rest[n], theta[n]) for n in theta)
    # the same task scores the same alone or after others: nothing carries over from task to task
    alone = engine.evaluate_batch(batch.tasks(slice(TASKS - 1, TASKS)), steps=2)
    together = engine.evaluate_batch(batch, steps=2)
    assert torch.equal(alone[0], together[TASKS - 1])


def test_resume_is_exact():
    """A checkpoint (model, optimiser, CAVIA's state) restored into fresh objects continues bit-identically."""
    from metalearn.data.sinusoid import SinusoidSampler

    def fresh():
        torch.manual_seed(0)
        model = MLP()
        algo = Engine(CAVIA(model, inner_lr=1.0, inner_steps=1, context_dim=5, loss="mse"))
        return model, algo, algo.outer_optimizer(model.parameters(), 1e-2)

    def run(model, algo, opt, sampler, steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            algo.meta_step(sampler.sample(4))
            opt.step()

    model, algo, opt = fresh()
    sampler = SinusoidSampler(10, 10, seed=0)
    run(model, algo, opt, sampler, 6)
    straight = {**algo.params()}
    model, algo, opt = fresh()
    sampler = SinusoidSampler(10, 10, seed=0)
    run(model, algo, opt, sampler, 3)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "algo": algo.state_dict(),
             "sampler": sampler.state_dict()}
    model, algo, opt = fresh()
    with torch.no_grad():
        for p in algo.meta_parameters():  # a different starting point: only the checkpoint can restore it
            p.add_(1.0)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    algo.load_state_dict(saved["algo"])
    sampler = SinusoidSampler(10, 10, seed=0)
    sampler.load_state_dict(saved["sampler"])
    run(model, algo, opt, sampler, 3)
    resumed = algo.params()
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)


# --- (3) learning ----------------------------------------------------------------------------------

def test_sinusoid_cli_learns_and_eval_reproduces(tmp_path):
    """`metalearn train cavia_sinusoid` (meta-batch 5, outer lr 3e-3, 200 steps) against the same preset
    untrained, on the same 100 fixed test episodes (1 inner step of lr 1.0 on the context), then `metalearn
    eval` of the checkpoint (model and CAVIA's input-context weights) gives the run's numbers exactly.
    Measured (seed 0, CPU): MSE 4.15 untrained -> 1.51 (in-process, 200 other episodes: 4.35 -> 1.65)."""
    fast = ["eval.episodes=100", "tracking.progress=false", "threads=1", "outer.meta_batch_size=5",
            "outer.lr=0.003", f"tracking.out_dir={tmp_path}"]

    def train(name, iterations):
        assert main(["train", "cavia_sinusoid", *fast, f"tracking.name={name}", f"outer.iterations={iterations}"]) == 0
        return json.loads((tmp_path / name / "eval-test.json").read_text())["eval"]

    untrained, trained = train("untrained", 0), train("trained", 200)
    print(f"\ncavia sinusoid: test MSE {untrained['mean']:.3f} untrained -> {trained['mean']:.3f} after 200 steps")
    assert trained["metric"] == "mse" and trained["inner_steps"] == 1
    assert trained["mean"] < 0.6 * untrained["mean"], (untrained["mean"], trained["mean"])
    ckpt = torch.load(tmp_path / "trained" / "checkpoint.pt", weights_only=True)
    assert set(ckpt["algorithm"]["conditioning"]) == {"context_in.weight"}
    assert main(["eval", str(tmp_path / "trained"), "--no-progress", "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["eval"]
    assert again["accuracies"] == trained["accuracies"]


@pytest.mark.slow
def test_short_run_improves_on_omniglot(data_root, cache_dir):
    """As tests/test_algorithms_learning.py: conv4 (hidden 16), 4 tasks per step, 40 outer steps of Adam 3e-3,
    2 inner steps of lr 1.0 on 100 context parameters, FiLM at the last block (film_block=3 learned fastest in
    40 steps: block 2 reached 29.9%, block 0 21.3%; after 500 steps block 2 51.9%, block 3 50.4%). 50 fixed TEST
    episodes, 5 queries per class. Measured (seed 0, CPU): 20.0% untrained -> 37.8%."""
    from metalearn.data import EpisodeSampler, open_dataset
    from metalearn.evaluation import evaluate

    cfg = DataConfig(dataset="omniglot", root=str(data_root / "omniglot"), cache_dir=str(cache_dir))
    ds, splits = open_dataset(cfg)
    images = {k: ds.images[v] for k, v in splits.items()}
    torch.manual_seed(0)
    model = Conv4(hidden=16, num_classes=5)
    algo = Engine(CAVIA(model, inner_lr=1.0, inner_steps=2, context_dim=100, film_block=3))
    acc = lambda: evaluate(algo, images["test"], ways=5, shots=1, query_shots=5, episodes=50, seed=0,  # noqa: E731
                           batch_size=50, inner_steps=2, inner_lr=1.0).mean
    before = acc()
    opt = algo.outer_optimizer(model.parameters(), 3e-3)
    sampler = EpisodeSampler(images["train"], 5, 1, 2, seed=0, split="train")
    for step in range(1, 41):
        opt.zero_grad(set_to_none=True)
        algo.schedule(step, 40, opt)
        algo.meta_step(sampler.sample(4))
        opt.step()
    after = acc()
    print(f"\ncavia omniglot: test accuracy {100 * before:.1f}% untrained -> {100 * after:.1f}% after 40 steps")
    assert after >= before + 0.08 and after >= 0.30, (before, after)


# --- (4) registry, config, errors ------------------------------------------------------------------------

def test_registry_capabilities_and_from_config():
    assert registry.get("cavia") is CAVIA
    caps = registry.capabilities("cavia")
    assert not caps.batchable and not caps.hybrid and caps.shardable and not caps.lora and caps.inner_checkpoint
    model = Conv4(hidden=8)
    algo = build_algorithm(load_config(None, ["outer.algorithm=cavia", "inner.steps=2"]), model)
    assert isinstance(algo, Engine) and isinstance(algo.algorithm, CAVIA) and algo.plan()[0] == "loop"
    assert algo.adapt == ["context"] and algo.inner_steps == 2 and algo.context_dim == 100
    assert algo.conditioning.kind == "film" and algo.conditioning.site == "features.2.pool"
    assert algo.conditioning.film.weight.shape == (16, 100)  # gamma and beta for the 8 channels of block 2

    omniglot = load_config("cavia_omniglot_5w1s")
    assert (omniglot.outer.algorithm, omniglot.inner.steps, omniglot.inner.lr, omniglot.cavia.film_block) == \
        ("cavia", 2, 1.0, 2)
    sine = load_config("cavia_sinusoid")
    algo = build_algorithm(sine, MLP(hidden=sine.model.hidden))
    assert algo.loss == "mse" and algo.context_dim == 5
    assert algo.conditioning.kind == "concat" and algo.conditioning.site == "features.0"

    state = algo.state_dict()
    other = build_algorithm(sine, MLP(hidden=sine.model.hidden))
    other.load_state_dict(state)
    assert torch.equal(other.conditioning.context_in.weight, algo.conditioning.context_in.weight)
    with pytest.raises(MetalearnError, match="cavia state: the conditioning layer does not match"):
        build_algorithm(load_config("cavia_sinusoid", ["cavia.context_dim=4"]), MLP()).load_state_dict(state)


def test_bad_settings_are_one_line_errors():
    model = Conv4(hidden=8)
    cavia = ["outer.algorithm=cavia"]
    for overrides, match in [
        (["inner.adapt=[head.*]"], "cavia adapts only its context parameters"),
        (["cavia.context_dim=0"], "cavia.context_dim must be >= 1"),
        (["cavia.film_block=4"], r"cavia.film_block must be in 0..3"),
        (["outer.execution=batched"], "execution=batched is not available"),
        (["model.name=conv4_perstep"], "cavia conditions conv4 .FiLM. or mlp"),
    ]:
        with pytest.raises(MetalearnError, match=match):
            build_algorithm(load_config(None, cavia + overrides), model)
    with pytest.raises(MetalearnError, match="inner.lora_rank"):
        load_config(None, cavia + ["inner.lora_rank=2"])
    with pytest.raises(MetalearnError, match="cavia conditions conv4"):
        CAVIA(Conv4PerStep(hidden=8), inner_lr=1.0, inner_steps=1)
