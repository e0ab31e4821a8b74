"""The batched execution path (tasks as a batch dimension) and the hybrid one (batched support sets,
per-task query sets) against the per-task loop and the independent reference, in float64 with
BatchNorm on: meta-gradients, metrics, evaluation."""
import pytest
import torch

from metalearn.algorithms import ALGORITHMS, MAML
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.inner.batched import batched_forward
from metalearn.inner import forward
from metalearn.models import MLP
from metalearn.types import Examples, TaskBatch

from reference import maml_meta_gradient
from test_maml_gradients import LR, STEPS, assert_close, make_batch, make_model


def grads_of(algo, batch) -> "tuple[dict, dict]":
    algo.model.zero_grad(set_to_none=True)
    for p in algo.meta_parameters():
        p.grad = None
    metrics = algo.meta_step(batch)
    named = dict(algo.model.named_parameters())
    named.update({f"learnable.{i}": p for i, p in enumerate(algo.meta_parameters())})
    return {n: p.grad.clone() for n, p in named.items() if p.grad is not None}, metrics


FAST = ["batched", "hybrid"]


def both(make_algo, batch, task_chunk=0, mode="batched") -> "tuple[tuple, tuple]":
    loop = grads_of(Engine(make_algo(), "loop"), batch)
    fast_algo = Engine(make_algo(), mode, task_chunk)
    assert fast_algo.plan()[0] == mode
    return loop, grads_of(fast_algo, batch)


def test_batched_forward_equals_module_forward_per_task():
    model, batch = make_model(), make_batch()
    fwd = batched_forward(model)
    params = dict(model.named_parameters())
    per_task = {n: torch.stack([p + 0.01 * i for i in range(batch.num_tasks)]) for n, p in params.items()}
    got = fwd(per_task, batch.query.x)
    for i in range(batch.num_tasks):
        ref = forward(model, {n: p[i] for n, p in per_task.items()}, batch.query.x[i])
        torch.testing.assert_close(got[i], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", FAST)
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("batchnorm", [True, False], ids=["bn", "nobn"])
def test_batched_meta_gradient_matches_reference(first_order, batchnorm, mode):
    model, batch = make_model(batchnorm=batchnorm), make_batch()
    algo = Engine(MAML(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order), mode)
    got, _ = grads_of(algo, batch)
    ref = maml_meta_gradient(dict(model.named_parameters()), batch, lr=LR, steps=STEPS, first_order=first_order,
                             batchnorm=batchnorm)
    assert_close(got, ref)


CASES = {
    "maml-head-only": lambda m: ALGORITHMS["maml"](m, inner_lr=LR, inner_steps=STEPS, adapt=["head.*"]),
    "maml-body-only": lambda m: ALGORITHMS["maml"](m, inner_lr=LR, inner_steps=STEPS, adapt=["features.*"]),
    "boil": lambda m: ALGORITHMS["boil"](m, inner_lr=LR, inner_steps=STEPS),
    "anil": lambda m: ALGORITHMS["anil"](m, inner_lr=LR, inner_steps=STEPS),
    "anil-first-order": lambda m: ALGORITHMS["anil"](m, inner_lr=LR, inner_steps=STEPS, first_order=True),
    "metasgd": lambda m: ALGORITHMS["metasgd"](m, inner_lr=0.1, inner_steps=STEPS),
    "metasgd-first-order": lambda m: ALGORITHMS["metasgd"](m, inner_lr=0.1, inner_steps=STEPS, first_order=True),
}


@pytest.mark.parametrize("mode", FAST)
@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_equals_loop(case, mode):
    model, batch = make_model(), make_batch()
    if mode == "hybrid" and case.startswith("anil"):  # ANIL batches its own query pass
        with pytest.raises(MetalearnError, match="execution=hybrid is not available"):
            Engine(CASES[case](model), "hybrid")
        return
    (g_loop, m_loop), (g_fast, m_fast) = both(lambda: CASES[case](model), batch, mode=mode)
    assert_close(g_fast, g_loop)
    assert m_fast["loss"] == pytest.approx(m_loop["loss"], rel=1e-12)
    assert m_fast["accuracy"] == pytest.approx(m_loop["accuracy"], abs=1e-12)


@pytest.mark.parametrize("mode", FAST)
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_task_chunks_give_the_same_meta_gradient(chunk, mode, algorithm):
    """Chunks of 3 run through the batched forward; hybrid's chunks of one task run the task's own forward
    (engine._hybrid_adapt), Meta-SGD's learned lrs included. Both equal the loop, and so does evaluation."""
    model, batch = make_model(), make_batch()
    make = lambda: ALGORITHMS[algorithm](model, inner_lr=0.1, inner_steps=STEPS)  # noqa: E731
    (g_loop, m_loop), (g_fast, m_fast) = both(make, batch, task_chunk=chunk, mode=mode)
    assert_close(g_fast, g_loop)
    assert m_fast["loss"] == pytest.approx(m_loop["loss"], rel=1e-12)
    scores = Engine(make(), mode, chunk).evaluate_batch(batch)
    assert torch.equal(scores, Engine(make(), "loop").evaluate_batch(batch))


@pytest.mark.parametrize("mode", FAST)
def test_float32_batched_within_1e4_of_loop(mode):
    torch.backends.cudnn.allow_tf32 = False
    model, batch = make_model().float(), make_batch(dtype=torch.float32)
    (g_loop, _), (g_fast, _) = both(lambda: MAML(model, inner_lr=LR, inner_steps=STEPS), batch, mode=mode)
    assert_close(g_fast, g_loop, rtol=1e-4)


def sinusoid_batch(T=6, K=10, Q=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, K + Q, 1, generator=g, dtype=torch.float64) * 10 - 5
    a = torch.rand(T, 1, 1, generator=g, dtype=torch.float64) * 4.9 + 0.1
    y = a * torch.sin(x)
    return TaskBatch(Examples(x[:, :K], y[:, :K]), Examples(x[:, K:], y[:, K:]), 1, K, Q)


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_batched_mlp_regression_equals_loop(first_order):
    torch.manual_seed(0)
    model, batch = MLP().double(), sinusoid_batch()
    make = lambda: MAML(model, inner_lr=0.01, inner_steps=3, first_order=first_order, loss="mse")  # noqa: E731
    (g_loop, m_loop), (g_fast, m_fast) = both(make, batch)
    assert_close(g_fast, g_loop)
    assert m_fast["mse"] == pytest.approx(m_loop["mse"], rel=1e-12)


@pytest.mark.parametrize("case", ["maml", "metasgd", "anil", "maml-hybrid", "metasgd-hybrid"])
def test_batched_evaluation_equals_loop(case):
    model, batch = make_model(), make_batch()
    make = {"maml": lambda: MAML(model, inner_lr=LR, inner_steps=STEPS),
            "metasgd": lambda: CASES["metasgd"](model), "anil": lambda: CASES["anil"](model)}[case.split("-")[0]]
    loop = Engine(make(), "loop").evaluate_batch(batch, steps=3, lr=0.3)
    fast = Engine(make(), case.split("-")[1] if "-" in case else "batched", 2).evaluate_batch(batch, steps=3, lr=0.3)
    assert torch.equal(loop, fast)


def test_plan_falls_back_and_batched_refuses_unsupported():
    model = make_model()
    anil = ALGORITHMS["anil"](model, inner_lr=LR, inner_steps=1, cached=False)
    mode, why = Engine(anil).plan()
    assert mode == "loop" and "anil with cached=False runs the naive per-task path" in why  # cached=False: naive path
    with pytest.raises(MetalearnError, match="execution=batched is not available"):
        Engine(anil, "batched")
    with pytest.raises(MetalearnError, match="execution must be"):
        Engine(MAML(model, inner_lr=LR, inner_steps=1), "fast")
    assert Engine(MAML(model, inner_lr=LR, inner_steps=1), "batched").plan()[0] == "batched"
    assert Engine(MAML(model, inner_lr=LR, inner_steps=1), "batched").execution_plan()[0] == "batched"  # the alias
    mode, why = Engine(MAML(model, inner_lr=LR, inner_steps=1)).plan()  # auto: conv4 on CPU -> hybrid
    assert mode == "hybrid" and "query sets one task at a time" in why
    mode, why = Engine(ALGORITHMS["anil"](model, inner_lr=LR, inner_steps=1)).plan()  # no hybrid for ANIL
    assert mode == "loop" and "per-task loop is faster" in why
    assert Engine(MAML(MLP(), inner_lr=LR, inner_steps=1, loss="mse")).plan()[0] == "batched"


@pytest.mark.parametrize("mode", FAST)
def test_engine_refuses_batched_for_an_algorithm_without_a_batched_path(mode):
    """MAML++ declares no batched path (per-step BatchNorm with running statistics, multi-step loss):
    execution=batched/hybrid is refused up front with the reason, and auto falls back to the per-task loop
    with the same reason. (Any model has a batched path now: tests/test_generic_batched.py.)"""
    from metalearn.algorithms import MAMLPlusPlus

    mamlpp = MAMLPlusPlus(make_model(), inner_lr=LR, inner_steps=STEPS)
    with pytest.raises(MetalearnError, match=rf"^execution={mode} is not available: MAMLPlusPlus runs per task "
                                             r"\(it declares no batched path\); use execution=loop or auto$"):
        Engine(mamlpp, mode)
    assert Engine(mamlpp).plan() == ("loop", "batched path unavailable (MAMLPlusPlus runs per task "
                                             "(it declares no batched path))")
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 5)).double()
    assert Engine(MAML(plain, inner_lr=LR, inner_steps=STEPS), mode).plan()[0] == mode  # any model batches


def test_auto_off_the_cpu_picks_hybrid_for_large_models_only(monkeypatch):
    """auto on an accelerator: batched below AUTO_CUDA_HYBRID_PARAMETERS, hybrid at or above it (ResNet-12 ran
    faster hybrid on the H200). plan() reads only the parameters' device and count, so models on the meta
    device stand in for CUDA ones here."""
    import metalearn.engine as engine
    from metalearn.models import ResNet12

    def plan(model):
        return Engine(MAML(model.to("meta"), inner_lr=LR, inner_steps=STEPS)).plan()

    resnet = ResNet12(3, 5, image_size=84)
    assert sum(p.numel() for p in resnet.parameters()) >= engine.AUTO_CUDA_HYBRID_PARAMETERS
    mode, why = plan(resnet)
    assert mode == "hybrid" and why.startswith("auto on meta with ResNet12 (12.4M parameters")
    assert plan(make_model())[0] == "batched"
    assert plan(MLP())[0] == "batched"
    monkeypatch.setattr(engine, "AUTO_CUDA_HYBRID_PARAMETERS", 1)  # the threshold decides, not the class
    assert plan(make_model())[0] == "hybrid"
    assert plan(MLP())[0] == "hybrid"
    assert Engine(MAML(make_model(), inner_lr=LR, inner_steps=STEPS)).plan()[0] == "hybrid"  # CPU: unchanged


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_on_cuda_matches_loop_float32_without_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, batch = make_model().float().cuda(), make_batch(dtype=torch.float32).to("cuda")
    make = lambda: MAML(model, inner_lr=LR, inner_steps=STEPS)  # noqa: E731
    assert Engine(make()).plan()[0] == "batched"  # auto picks batched on CUDA
    (g_loop, _), (g_fast, _) = both(make, batch)
    assert_close(g_fast, g_loop, rtol=1e-4)


def test_hybrid_automatic_chunks_split_the_support_batch(monkeypatch):
    import metalearn.engine as engine

    model, batch = make_model(), make_batch()
    monkeypatch.setattr(engine, "HYBRID_CHUNK_ELEMENTS", 1)  # -> one task per chunk
    algo = Engine(MAML(model, inner_lr=LR, inner_steps=STEPS), "hybrid")
    assert [sl.stop - sl.start for sl in algo._hybrid_chunks(batch)] == [1] * batch.num_tasks
    (g_loop, _), (g_fast, _) = both(lambda: MAML(model, inner_lr=LR, inner_steps=STEPS), batch, mode="hybrid")
    assert_close(g_fast, g_loop)


@pytest.mark.parametrize("shape", [(4, 6, 1, 12, 12), (2, 5, 3, 10, 10), (7, 1, 9, 9)])
def test_channels_last_keeps_values_and_makes_convolutions_channels_last(shape):
    from metalearn.inner.layout import channels_last, is_channels_last

    x = torch.rand(shape, dtype=torch.float64)
    y = channels_last(x)
    assert torch.equal(x, y) and is_channels_last(y) and not is_channels_last(torch.rand(*shape[:-3], 2, *shape[-2:]))
    assert (y.data_ptr() == x.data_ptr()) == (shape[-3] == 1)  # a view for one channel, a copy otherwise
    image = y[0] if y.dim() == 5 else y[0:3]  # one task of a meta-batch, as the hybrid path indexes it
    w = torch.rand(4, shape[-3], 3, 3, dtype=torch.float64)
    out = torch.nn.functional.conv2d(image, w, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(image.contiguous(), w, padding=1))
    with pytest.raises(ValueError, match="expects images"):
        channels_last(torch.rand(3, 4))


@pytest.mark.parametrize("mode", ["loop", *FAST])
@pytest.mark.parametrize("case", ["maml", "metasgd", "maml-head-only"])
def test_inner_checkpointing_gives_the_same_meta_gradient(case, mode):
    model, batch = make_model(), make_batch()
    make = {"maml": lambda: MAML(model, inner_lr=LR, inner_steps=STEPS),
            "metasgd": lambda: CASES["metasgd"](model), "maml-head-only": lambda: CASES["maml-head-only"](model)}[case]
    plain, _ = grads_of(Engine(make(), mode), batch)
    ckpt, metrics = grads_of(Engine(make().set_checkpoint(True), mode), batch)
    assert set(ckpt) == set(plain)
    for n in plain:  # same arithmetic, recomputed: bit for bit on CPU
        assert torch.equal(ckpt[n], plain[n]), n


def test_inner_checkpointing_is_refused_where_it_would_be_ignored():
    model = make_model()
    with pytest.raises(MetalearnError, match="inner.checkpoint: ANIL does not support inner-loop checkpointing"):
        ALGORITHMS["anil"](model, inner_lr=LR, inner_steps=1).set_checkpoint(True)
    from metalearn.inner import Adam, run_inner_loop

    support = Examples(make_batch().support.x[0], make_batch().support.y[0])
    with pytest.raises(ValueError, match="stateless rule"):
        run_inner_loop(model, dict(model.named_parameters()), support, adapt=["head.weight"], steps=1,
                       rule=Adam(0.1), checkpoint=True)
