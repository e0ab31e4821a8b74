"""The batched execution path (tasks as a batch dimension) against the per-task loop and the
independent reference, in float64 with BatchNorm on: meta-gradients, metrics, evaluation."""
import pytest
import torch

from metalearn.algorithms import ALGORITHMS, MAML
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


def both(make_algo, batch, task_chunk=0) -> "tuple[tuple, tuple]":
    loop = grads_of(make_algo().set_execution("loop"), batch)
    fast_algo = make_algo().set_execution("batched", task_chunk)
    assert fast_algo.execution_plan()[0] == "batched"
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


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("batchnorm", [True, False], ids=["bn", "nobn"])
def test_batched_meta_gradient_matches_reference(first_order, batchnorm):
    model, batch = make_model(batchnorm=batchnorm), make_batch()
    algo = MAML(model, inner_lr=LR, inner_steps=STEPS, first_order=first_order).set_execution("batched")
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_equals_loop(case):
    model, batch = make_model(), make_batch()
    (g_loop, m_loop), (g_fast, m_fast) = both(lambda: CASES[case](model), batch)
    assert_close(g_fast, g_loop)
    assert m_fast["loss"] == pytest.approx(m_loop["loss"], rel=1e-12)
    assert m_fast["accuracy"] == pytest.approx(m_loop["accuracy"], abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 3])
def test_task_chunks_give_the_same_meta_gradient(chunk):
    model, batch = make_model(), make_batch()
    make = lambda: MAML(model, inner_lr=LR, inner_steps=STEPS)  # noqa: E731
    (g_loop, m_loop), (g_fast, m_fast) = both(make, batch, task_chunk=chunk)
    assert_close(g_fast, g_loop)
    assert m_fast["loss"] == pytest.approx(m_loop["loss"], rel=1e-12)


def test_float32_batched_within_1e4_of_loop():
    torch.backends.cudnn.allow_tf32 = False
    model, batch = make_model().float(), make_batch(dtype=torch.float32)
    (g_loop, _), (g_fast, _) = both(lambda: MAML(model, inner_lr=LR, inner_steps=STEPS), batch)
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


@pytest.mark.parametrize("case", ["maml", "metasgd", "anil"])
def test_batched_evaluation_equals_loop(case):
    model, batch = make_model(), make_batch()
    make = {"maml": lambda: MAML(model, inner_lr=LR, inner_steps=STEPS),
            "metasgd": lambda: CASES["metasgd"](model), "anil": lambda: CASES["anil"](model)}[case]
    loop = make().set_execution("loop").evaluate_batch(batch, steps=3, lr=0.3)
    fast = make().set_execution("batched", 2).evaluate_batch(batch, steps=3, lr=0.3)
    assert torch.equal(loop, fast)


def test_plan_falls_back_and_batched_refuses_unsupported():
    model = make_model()
    anil = ALGORITHMS["anil"](model, inner_lr=LR, inner_steps=1, cached=False)
    mode, why = anil.execution_plan()
    assert mode == "loop" and "cached=False" in why
    with pytest.raises(MetalearnError, match="execution=batched is not available"):
        anil.set_execution("batched")
    with pytest.raises(MetalearnError, match="execution must be"):
        MAML(model, inner_lr=LR, inner_steps=1).set_execution("fast")
    assert MAML(model, inner_lr=LR, inner_steps=1).set_execution("batched").execution_plan()[0] == "batched"
    mode, why = MAML(model, inner_lr=LR, inner_steps=1).execution_plan()  # auto: conv4 on CPU loops
    assert mode == "loop" and "per-task loop is faster" in why
    assert MAML(MLP(), inner_lr=LR, inner_steps=1, loss="mse").execution_plan()[0] == "batched"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_on_cuda_matches_loop_float32_without_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, batch = make_model().float().cuda(), make_batch(dtype=torch.float32).to("cuda")
    make = lambda: MAML(model, inner_lr=LR, inner_steps=STEPS)  # noqa: E731
    assert make().execution_plan()[0] == "batched"  # auto picks batched on CUDA
    (g_loop, _), (g_fast, _) = both(make, batch)
    assert_close(g_fast, g_loop, rtol=1e-4)
