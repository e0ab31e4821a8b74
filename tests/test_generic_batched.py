"""Any nn.Module on the batched and hybrid paths (torch.func.vmap over tasks), and the normalisation policy.

float64, BatchNorm on: the vmap path equals the per-task loop and an independent reference written here with
torch.nn.functional and mean/var arithmetic (no metalearn code, no nn.BatchNorm2d / nn.GroupNorm kernels), to
<= 1e-10 by the global relative L2 error over all parameters, for conv4 (through vmap, its hand-written twin
switched off) and for a user-defined model with BatchNorm (tracking running statistics), GroupNorm and a
residual connection; second and first order, 1 and 3 inner steps, masks, Meta-SGD's learned lrs, ANIL's
cached features, a custom loss and metric. ResNet-12: tests/test_models_resnet12.py.

Guards against vacuous passes: every reference gradient is non-zero, and first- and second-order references
differ by far more than the tolerance, so a path that dropped the second-order terms would fail.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms import ALGORITHMS, MAML
from metalearn.engine import Engine
from metalearn.inner.norm import running_stats_layers, stateless
from metalearn.models import Conv4
from metalearn.types import Examples, TaskBatch

from reference import conv4_forward, general_meta_gradient, resnet12_forward

TASKS, WAYS, SHOTS, QUERY, LR = 3, 5, 2, 3, 0.3
TOL = 1e-10


# --- a user model: BatchNorm with running statistics, GroupNorm, a residual connection --------------------------
class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)

    def forward(self, h):
        return h + self.norm(self.conv(h)).relu()


class UserNet(nn.Module):
    """What a researcher might write: nothing metalearn-specific."""

    def __init__(self, c: int = 6, classes: int = WAYS, size: int = 12):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), Residual(c),
                                      nn.MaxPool2d(2))
        self.head = nn.Linear(c * (size // 2) ** 2, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def user_reference(w: dict, x: torch.Tensor) -> torch.Tensor:
    """UserNet written out: BatchNorm and GroupNorm from mean and biased variance (batch statistics)."""
    h = F.conv2d(x, w["features.0.weight"], w["features.0.bias"], padding=1)
    mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + 1e-5) * w["features.1.weight"].view(1, -1, 1, 1) \
        + w["features.1.bias"].view(1, -1, 1, 1)
    h = h.relu()
    r = F.conv2d(h, w["features.3.conv.weight"], w["features.3.conv.bias"], padding=1)
    n, c = r.shape[:2]
    g = r.reshape(n, 2, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
    r = g.reshape(r.shape) * w["features.3.norm.weight"].view(1, -1, 1, 1) + w["features.3.norm.bias"].view(1, -1, 1, 1)
    h = F.max_pool2d(h + r.relu(), 2)
    return h.flatten(1) @ w["head.weight"].t() + w["head.bias"]


def make_user(seed: int = 0) -> UserNet:
    torch.manual_seed(seed)
    m = UserNet().double()
    with torch.no_grad():  # non-trivial normalisation affine parameters
        for n, p in m.named_parameters():
            if "norm" in n or n.startswith("features.1"):
                p.add_(0.2 * torch.randn_like(p))
    return m


def make_conv4(seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    m = Conv4(hidden=6, num_classes=WAYS, image_size=16).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m


def make_resnet12(seed: int = 0) -> nn.Module:
    from metalearn.models import ResNet12

    torch.manual_seed(seed)
    m = ResNet12(in_channels=1, num_classes=WAYS, image_size=16, channels=[4, 6, 8, 8]).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m


MODELS = {"user": (make_user, 12, user_reference), "conv4": (make_conv4, 16, lambda w, x: conv4_forward(w, x)),
          "resnet12": (make_resnet12, 16, lambda w, x: resnet12_forward(w, x))}


def make_batch(size: int, seed: int = 0, tasks: int = TASKS) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, WAYS * SHOTS, 1, size, size, generator=g, dtype=torch.float64)
    qx = torch.rand(tasks, WAYS * QUERY, 1, size, size, generator=g, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1)
    qy = torch.arange(WAYS).repeat_interleave(QUERY).expand(tasks, -1)
    return TaskBatch(Examples(sx, sy), Examples(qx, qy), WAYS, SHOTS, QUERY)


def rel_l2(got: dict, ref: dict) -> float:
    """Global relative L2 error over all parameters (conv biases before BatchNorm have a zero true gradient:
    a per-tensor relative error there is noise)."""
    assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
    num = sum((got[k] - ref[k]).pow(2).sum() for k in ref)
    den = sum(ref[k].pow(2).sum() for k in ref)
    assert den > 0, "vacuous: the reference gradient is zero"
    return float((num / den).sqrt())


def meta_grads(engine: Engine, batch: TaskBatch) -> dict:
    engine.model.zero_grad(set_to_none=True)
    for p in engine.meta_parameters():
        p.grad = None
    engine.meta_step(batch)
    return {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("name", ["user", "conv4", "resnet12"])
def test_vmap_path_equals_loop_and_reference(name, order, steps):
    make, size, ref_forward = MODELS[name]
    batch, first_order = make_batch(size), order == "first"
    w0 = dict(make().named_parameters())
    ref, _ = general_meta_gradient(w0, batch, steps=steps, first_order=first_order,
                                   lrs={n: torch.tensor(LR, dtype=torch.float64) for n in w0},
                                   forward=lambda w, x, s: ref_forward(w, x))
    other, _ = general_meta_gradient(w0, batch, steps=steps, first_order=not first_order,
                                     lrs={n: torch.tensor(LR, dtype=torch.float64) for n in w0},
                                     forward=lambda w, x, s: ref_forward(w, x))
    assert rel_l2(other, ref) > 1e-4, "vacuous: first and second order agree on this problem"
    for mode in ["loop", "batched", "hybrid"]:
        engine = Engine(MAML(make(), inner_lr=LR, inner_steps=steps, first_order=first_order), mode, twin=False)
        assert engine.plan()[0] == mode
        err = rel_l2(meta_grads(engine, batch), ref)
        assert err <= TOL, f"{name} {mode}: {err:.2e}"


@pytest.mark.parametrize("adapt", [["head.*"], ["features.*"], ["features.3.*", "head.bias"]])
def test_vmap_path_with_masks(adapt):
    """Masks: the shared (not adapted) parameters stay unbatched under vmap and get the sum of the tasks'
    gradients; the reference adapts the same names."""
    batch = make_batch(12)
    w0 = dict(make_user().named_parameters())
    names = [n for n in w0 if any(__import__("fnmatch").fnmatch(n, a) for a in adapt)]
    ref, _ = general_meta_gradient(w0, batch, steps=2, first_order=False, adapt=names,
                                   lrs={n: torch.tensor(LR, dtype=torch.float64) for n in names},
                                   forward=lambda w, x, s: user_reference(w, x))
    for mode in ["batched", "hybrid"]:
        engine = Engine(MAML(make_user(), inner_lr=LR, inner_steps=2, adapt=adapt), mode)
        assert rel_l2(meta_grads(engine, batch), ref) <= TOL


@pytest.mark.parametrize("mode", ["batched", "hybrid"])
def test_vmap_path_with_metasgd_lrs(mode):
    """Meta-SGD on the user model: the model's meta-gradient and the learned per-element lrs' gradient equal
    the reference's (the lrs are shared by all tasks, so vmap leaves them unbatched)."""
    batch = make_batch(12)
    model = make_user()
    algo = ALGORITHMS["metasgd"](model, inner_lr=0.1, inner_steps=2)
    alphas = algo.alpha.by_name()  # {parameter name: its learned lrs}
    with torch.no_grad():  # distinct lrs, so a mix-up of names would show
        for i, a in enumerate(alphas.values()):
            a.mul_(1 + 0.1 * i)
    lrs = {n: a.detach().clone() for n, a in alphas.items()}
    ref_w, ref_lr = general_meta_gradient(dict(model.named_parameters()), batch, steps=2, first_order=False,
                                          lrs=lrs, forward=lambda w, x, s: user_reference(w, x))
    engine = Engine(algo, mode)
    got = meta_grads(engine, batch)
    assert rel_l2(got, ref_w) <= TOL
    got_lr = {n: a.grad for n, a in alphas.items()}
    assert rel_l2(got_lr, ref_lr) <= TOL


def test_anil_generic_features_and_head():
    """ANIL on a user model: the body runs once per task through vmap (shared parameters), the heads adapt
    together; equal to the per-task loop."""
    batch = make_batch(12)
    make = lambda: ALGORITHMS["anil"](make_user(), inner_lr=LR, inner_steps=3)  # noqa: E731
    loop = meta_grads(Engine(make(), "loop"), batch)
    batched = meta_grads(Engine(make(), "batched"), batch)
    assert rel_l2(batched, loop) <= TOL
    scores = [Engine(make(), mode).evaluate_batch(batch, steps=3) for mode in ["loop", "batched"]]
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)


def test_custom_loss_and_metric():
    """A callable loss (label smoothing) and a named callable metric, in every path: the meta-gradient equals
    the reference computed with the same loss, and evaluation reports the custom metric."""
    batch = make_batch(12)

    def smoothed(out, y):
        return F.cross_entropy(out, y, label_smoothing=0.1)

    def top2(out, y):
        return (out.topk(2, -1).indices == y[:, None]).any(-1).double().mean()

    w0 = dict(make_user().named_parameters())
    ref, _ = general_meta_gradient(w0, batch, steps=2, first_order=False, loss=smoothed,
                                   lrs={n: torch.tensor(LR, dtype=torch.float64) for n in w0},
                                   forward=lambda w, x, s: user_reference(w, x))
    for mode in ["loop", "batched", "hybrid"]:
        engine = Engine(MAML(make_user(), inner_lr=LR, inner_steps=2, loss=smoothed, metric=("top2", top2)), mode)
        assert engine.metric_name == "top2"
        metrics = engine.meta_step(batch)
        assert set(metrics) == {"loss", "top2"}
        assert rel_l2(meta_grads(engine, batch), ref) <= TOL
        scores = engine.evaluate_batch(batch, steps=2)
        assert scores.shape == (TASKS,) and scores.dtype == torch.float64 and ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(Exception, match="loss must be one of"):
        MAML(make_user(), inner_lr=LR, inner_steps=1, loss="hinge")


# --- the normalisation state policy ---------------------------------------------------------------------------
def _stats(model: nn.Module) -> dict:
    return {n: b.clone() for n, b in model.named_buffers()}


def test_running_statistics_are_never_read_or_written():
    """meta_step and evaluate_batch, in every path and in train and eval mode, leave a tracking BatchNorm's
    running statistics (and its counter) bit for bit as they were; a plain forward of the same module would
    have changed them (so the check is not vacuous)."""
    model = make_user()
    assert running_stats_layers(model) == ["features.1"]
    batch = make_batch(12)
    with torch.no_grad():  # running statistics far from any batch's: reading them would change every output
        model.features[1].running_mean.fill_(5.0)
        model.features[1].running_var.fill_(9.0)
    before = _stats(model)
    for mode in ["loop", "batched", "hybrid"]:
        engine = Engine(MAML(model, inner_lr=LR, inner_steps=2), mode)
        engine.meta_step(batch)
        for training in [True, False]:
            model.train(training)
            engine.evaluate_batch(batch, steps=2)
            engine.evaluate_batch(batch, steps=2, transductive=False)
            assert model.training is training  # evaluation restores the mode it found
        model.train()
        for n, b in _stats(model).items():
            assert torch.equal(b, before[n]), f"{mode}: {n} changed"
    model(batch.support.x[0])  # what PyTorch itself does in training mode
    assert not torch.equal(model.features[1].running_mean, before["features.1.running_mean"])


def test_episode_results_do_not_depend_on_earlier_episodes():
    """Episode k scored alone equals episode k scored after other episodes (and after meta-training steps on
    them), for a model whose BatchNorm tracks running statistics, in train and eval mode."""
    batch = make_batch(12, seed=1, tasks=4)
    last = TaskBatch(Examples(batch.support.x[3:], batch.support.y[3:]), Examples(batch.query.x[3:],
                                                                                     batch.query.y[3:]),
                     WAYS, SHOTS, QUERY)
    for training in [True, False]:
        alone = Engine(MAML(make_user(), inner_lr=LR, inner_steps=2)).evaluate_batch(last, steps=2)
        model = make_user()
        model.train(training)
        engine = Engine(MAML(model, inner_lr=LR, inner_steps=2))
        engine.evaluate_batch(make_batch(12, seed=7), steps=2)   # other episodes first
        after = engine.evaluate_batch(batch, steps=2)[3:]
        torch.testing.assert_close(after, alone, rtol=0, atol=0)
        fresh = make_user()
        plain = [fresh(batch.query.x[t]).argmax(-1) for t in range(4)]  # noqa: F841 - PyTorch updates the stats
        assert not torch.equal(fresh.features[1].running_mean, make_user().features[1].running_mean)


def test_stateless_view_shares_parameters_and_follows_modes():
    model = make_user()
    view = stateless(model)
    assert view is not model and type(view.features[1]).__name__ == "BatchStats"
    assert dict(view.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))  # the same tensors
    model.eval()
    assert not stateless(model).training and not stateless(model).features.training
    conv4 = make_conv4()
    assert stateless(conv4) is conv4  # no running statistics: the reference path is untouched
    model.head = nn.Linear(model.head.in_features, WAYS).double()  # a replaced head is seen
    assert stateless(model).head is model.head


@pytest.mark.parametrize("under_vmap", [False, True])
def test_the_norm_policy_reaches_code_that_torch_compile_traces(under_vmap):
    """metalearn/compiled.py traces `forward` (hence `stateless`) with torch.compile inside vmap_safe_norms().
    The policy must reach the trace: dynamo of torch 2.13 and older cannot trace the ContextVar that eager code
    reads (a torch 2.11 GPU run failed there), so the trace reads its plain-global mirror. Checked on the graph
    dynamo captures (backend "eager": no inductor): BatchNorm's kernel outside, the reduction form inside."""
    import contextlib

    from metalearn.inner.loop import forward
    from metalearn.inner.norm import vmap_safe_norms

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).double()
    params = dict(model.named_parameters())
    graphs = []

    def backend(gm, inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    stateless(model, all_batch_norms=under_vmap)  # the view is built outside the trace, as compiled.py's _norms does
    torch._dynamo.reset()
    fn = torch.compile(lambda p, x: forward(model, p, x), backend=backend, fullgraph=True, dynamic=False)
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    with vmap_safe_norms() if under_vmap else contextlib.nullcontext():
        out = fn(params, x)
        torch.testing.assert_close(out, forward(model, params, x), rtol=1e-12, atol=1e-12)
    assert len(graphs) == 1
    assert any("batch_norm" in t for t in graphs[0]) is not under_vmap, graphs[0]
    torch._dynamo.reset()


def test_dropout_is_off_in_evaluation_and_independent_per_task_in_training():
    """Evaluation runs the model in eval mode (dropout off: repeated evaluations agree); in the batched
    meta-step each task draws its own dropout mask (vmap randomness='different')."""
    class Dropped(UserNet):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.head(self.drop(self.features(x).flatten(1)))

    torch.manual_seed(0)
    model = Dropped().double()
    batch = make_batch(12)
    engine = Engine(MAML(model, inner_lr=LR, inner_steps=1), "batched")
    a, b = engine.evaluate_batch(batch, steps=1), engine.evaluate_batch(batch, steps=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.training
    same = TaskBatch(Examples(batch.support.x[:1].expand(2, -1, -1, -1, -1), batch.support.y[:1].expand(2, -1)),
                     Examples(batch.query.x[:1].expand(2, -1, -1, -1, -1), batch.query.y[:1].expand(2, -1)),
                     WAYS, SHOTS, QUERY)
    per_task = {n: p.expand(2, *p.shape) for n, p in model.named_parameters()}
    out = engine.tasks_forward()(per_task, same.query.x, 0)
    assert not torch.equal(out[0], out[1])  # the same task twice, two dropout masks


def test_a_model_vmap_cannot_run_is_refused_in_one_line():
    class ItemNet(nn.Module):  # data-dependent Python control flow: vmap cannot trace .item()
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(144, WAYS)

        def forward(self, x):
            if x.sum().item() > 0:
                x = x * 1.0
            return self.head(x.flatten(1))

    engine = Engine(MAML(ItemNet().double(), inner_lr=LR, inner_steps=1), "batched")
    with pytest.raises(Exception, match=r"^the batched path \(torch.func.vmap over tasks\) cannot run model ItemNet"):
        engine.meta_step(make_batch(12))
    Engine(MAML(ItemNet().double(), inner_lr=LR, inner_steps=1), "loop").meta_step(make_batch(12))  # the loop runs


def test_task_of_a_batch_and_of_examples_agree():
    """`TaskBatch.task(i)` drops the task dimension as `Examples.task(i)` does, so its support set is what the
    inner loop takes; `TaskBatch.tasks(sl)` keeps it (a smaller meta-batch)."""
    from metalearn import Task, inner_loop

    batch, model = make_batch(12), make_user()
    task = batch.task(1)
    assert isinstance(task, Task) and (task.ways, task.shots, task.query_shots) == (WAYS, SHOTS, QUERY)
    assert torch.equal(task.support.x, batch.support.task(1).x) and task.support.x.shape == (WAYS * SHOTS, 1, 12, 12)
    assert torch.equal(task.query.y, batch.query.task(1).y)
    fast = inner_loop(model, dict(model.named_parameters()), task.support, adapt=["head.weight", "head.bias"], lr=LR,
                      steps=1)
    assert fast["head.weight"].shape == model.head.weight.shape
    one = batch.tasks(slice(1, 2))
    assert one.num_tasks == 1 and torch.equal(one.support.x[0], task.support.x)
    scores = Engine(MAML(make_user(), inner_lr=LR, inner_steps=1)).evaluate_batch(one, steps=1)
    assert scores.shape == (1,)
