"""outer.compile (metalearn/compiled.py): the torch.func meta-step, eager and through torch.compile, against the
engine's per-task loop; the exactness gate; the refusals.

float64, conv4 with BatchNorm (4 filters, 16x16 images, perturbed BatchNorm affine parameters), 2 tasks, 1-2 inner
steps. Distances are the global relative L2 error over all parameters together (a conv bias right before BatchNorm
has a zero true gradient, so a per-tensor relative error there is noise), <= 1e-10.

Guards against vacuous passes: the loop's gradients are non-zero, and first- and second-order ones differ by far more
than the tolerance. The tests that run inductor (`slow`) take minutes on a 2-core CPU with a cold inductor cache
(about 2.5 min per compiled function), seconds with a warm one; the rest take seconds.
"""
import pytest
import torch

from metalearn.algorithms import ALGORITHMS, MAML
from metalearn.algorithms.registry import Capabilities
from metalearn.compiled import CompiledMetaStep, relative_l2, unsupported
from metalearn.config import Config, apply_overrides
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.inner import Adam
from metalearn.models import Conv4
from metalearn.types import Examples, TaskBatch

TASKS, WAYS, SHOTS, QUERY, SIZE, LR = 2, 5, 1, 2, 16, 0.3
TOL = 1e-10


def make_algo(name: str = "maml", steps: int = 1, first_order: bool = False, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = Conv4(1, WAYS, 4, SIZE).double()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return ALGORITHMS[name](model, inner_lr=LR, inner_steps=steps, first_order=first_order, **kw)


def make_batch(seed: int = 1, tasks: int = TASKS) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, WAYS * SHOTS, 1, SIZE, SIZE, dtype=torch.float64, generator=g)
    qx = torch.randn(tasks, WAYS * QUERY, 1, SIZE, SIZE, dtype=torch.float64, generator=g)
    labels = torch.arange(WAYS)
    return TaskBatch(Examples(sx, labels.repeat_interleave(SHOTS).expand(tasks, -1)),
                     Examples(qx, labels.repeat_interleave(QUERY).expand(tasks, -1)), WAYS, SHOTS, QUERY)


def trained(algo):
    return [*algo.model.parameters(), *algo.meta_parameters()]


def take_grads(algo) -> dict:
    """The accumulated .grad of the model and the learned lrs, by position; cleared after."""
    out = {str(i): p.grad.clone() for i, p in enumerate(trained(algo))}
    for p in trained(algo):
        p.grad = None
    return out


def loop_reference(algo, batch):
    metrics = Engine(algo, "loop").meta_step(batch)
    return take_grads(algo), metrics


def check_against_loop(algo, step, batch):
    """step(batch) (a meta-step) against the engine's per-task loop: gradients and metrics."""
    ref, ref_metrics = loop_reference(algo, batch)
    metrics = step(batch)
    got = take_grads(algo)
    assert all(float(g.abs().sum()) > 0 for g in ref.values() if g.dim() > 1)  # not vacuous
    assert relative_l2(got, ref) <= TOL
    assert metrics.keys() == ref_metrics.keys()
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-12)
    assert metrics["accuracy"] == ref_metrics["accuracy"]
    return ref


CASES = [("maml", 2, False), ("maml", 1, True), ("fomaml", 1, True), ("boil", 1, False), ("metasgd", 1, False),
         ("metasgd", 2, True)]


# --- the eager functional meta-step: the gate's reference --------------------------------------------------------
@pytest.mark.parametrize("vmap", [False, True], ids=["per-task", "vmap"])
@pytest.mark.parametrize("name,steps,first_order", CASES)
def test_eager_functional_meta_step_equals_the_loop(name, steps, first_order, vmap):
    algo = make_algo(name, steps, first_order)
    check_against_loop(algo, CompiledMetaStep(algo, compiled=False, vmap=vmap).meta_step, make_batch())


def test_vmapped_in_chunks_equals_the_loop():
    """The engine's task_chunk: 3 tasks vmapped 2 at a time (the last chunk has one)."""
    algo, batch = make_algo("metasgd", 2), make_batch(tasks=3)
    step = Engine(algo, "batched", task_chunk=2, compile=True).compiled
    assert step.vmap and step.chunk == 2
    step.compiled = False  # eager: the same functions, without torch.compile
    check_against_loop(algo, step.meta_step, batch)
    assert torch.equal(step.evaluate(batch, 2, None), Engine(algo, "loop").evaluate_batch(batch, steps=2))


def test_first_and_second_order_differ():
    """The tolerance separates them by far: a path that dropped the second-order terms would fail."""
    second, _ = loop_reference(make_algo("maml", 2, False), make_batch())
    first, _ = loop_reference(make_algo("maml", 2, True), make_batch())
    assert relative_l2(first, second) > 1e-3


def test_meta_step_accumulates_into_existing_grad():
    algo, batch = make_algo("metasgd", 1), make_batch()
    ref, _ = loop_reference(algo, batch)
    for p in trained(algo):
        p.grad = torch.ones_like(p)
    CompiledMetaStep(algo, compiled=False).meta_step(batch)
    got = take_grads(algo)
    assert relative_l2({k: g - 1 for k, g in got.items()}, ref) <= TOL


@pytest.mark.parametrize("vmap", [False, True], ids=["per-task", "vmap"])
def test_eager_functional_evaluation_equals_the_engine(vmap):
    algo, batch = make_algo("metasgd", 1), make_batch(tasks=4)
    want = Engine(algo, "loop").evaluate_batch(batch, steps=2)
    step = CompiledMetaStep(algo, compiled=False, vmap=vmap)
    with torch.no_grad():
        got = step.evaluate(batch, 2, None)
        outs = step.query_outputs(batch, 2, None, compiled=False)
    assert torch.equal(got, want) and got.dtype == torch.float64
    assert outs.shape == (4, WAYS * QUERY, WAYS)


# --- the gate ------------------------------------------------------------------------------------------------------
def perturbed(scale: float):
    """A stand-in for torch.compile whose function returns the eager result with every gradient (or output) scaled."""
    def compile_(eager):
        def wrong(*args):
            result = eager(*args)
            if isinstance(result, torch.Tensor):  # evaluation: query outputs
                return result * scale
            (g_theta, g_lrs), aux = result
            return ({n: g * scale for n, g in g_theta.items()}, g_lrs), aux
        return wrong
    return compile_


def test_gate_refuses_a_wrong_meta_gradient_and_leaves_grad_untouched(monkeypatch, capsys):
    algo, batch = make_algo("maml", 1), make_batch()
    engine = Engine(algo, "loop", compile=True)
    monkeypatch.setattr(engine.compiled, "_compile", perturbed(1 + 1e-6))
    for p in trained(algo):
        p.grad = torch.full_like(p, 7.0)
    with pytest.raises(MetalearnError) as e:
        engine.meta_step(batch)
    assert str(e.value).startswith("outer.compile: the compiled meta-gradient is 1e-06 from the eager one on this "
                                   "model (tolerance 1e-10); run without outer.compile")
    assert all(bool((p.grad == 7.0).all()) for p in trained(algo))
    assert "compiling the meta-step with torch.compile" in capsys.readouterr().err
    with pytest.raises(MetalearnError, match="meta-gradient is 1e-06"):  # refused again: never marked as checked
        engine.meta_step(batch)


def test_gate_passes_within_the_tolerance_then_trusts_the_compiled_function(monkeypatch, capsys):
    algo, batch = make_algo("maml", 1), make_batch()
    ref, _ = loop_reference(algo, batch)
    step = CompiledMetaStep(algo)
    monkeypatch.setattr(step, "_compile", perturbed(1 + 1e-12))
    step.meta_step(batch)
    assert relative_l2(take_grads(algo), ref) <= TOL
    err = capsys.readouterr().err
    assert "metalearn: compiling the meta-step" in err and "agrees with the eager one" in err
    assert list(step._checked.values())[0] == pytest.approx(1e-12, rel=1e-3)
    calls, real = [], step.meta_gradient

    def counted(batch, compiled=True):
        calls.append(compiled)
        return real(batch, compiled=compiled)

    monkeypatch.setattr(step, "meta_gradient", counted)
    step.meta_step(make_batch(seed=2))  # the same shapes: no second check, the compiled function alone
    assert calls == [True] and len(step._checked) == 1


def test_gate_refuses_a_wrong_evaluation(monkeypatch):
    algo, batch = make_algo("maml", 1), make_batch()
    engine = Engine(algo, "loop", compile=True)
    monkeypatch.setattr(engine.compiled, "_compile", perturbed(1 + 1e-3))
    with pytest.raises(MetalearnError, match=r"^outer.compile: the compiled adapted query output is 0.001 from the "
                                             r"eager one on this model \(tolerance 1e-10\)"):
        engine.evaluate_batch(batch)


def test_float32_gate_allows_what_float32_rounding_explains(monkeypatch, capsys):
    """float32 beyond 1e-3: the bound becomes ROUNDING_FACTOR x the eager result's own distance to float64."""
    algo, batch = make_algo("maml", 1), make_batch()
    algo.model.float()
    batch = TaskBatch(Examples(batch.support.x.float(), batch.support.y), Examples(batch.query.x.float(),
                      batch.query.y), WAYS, SHOTS, QUERY)
    step = CompiledMetaStep(algo)
    monkeypatch.setattr(step, "_compile", perturbed(1 + 5e-3))
    with pytest.raises(MetalearnError, match=r"meta-gradient is 0.005 from the eager one on this model \(tolerance "
                                             r"0.001\)"):
        step.meta_step(batch)  # rounding here is ~1e-7: the perturbation is not explained by it
    assert "float32 rounding alone moves the eager result" in capsys.readouterr().err
    assert all(p.grad is None for p in trained(algo))
    monkeypatch.setattr("metalearn.compiled.ROUNDING_FACTOR", 1e7)
    step.meta_step(batch)  # as if the batch amplified float32 rounding that much: accepted
    assert all(p.grad is not None for p in trained(algo))


def test_gate_refuses_non_finite_compiled_results(monkeypatch):
    algo, batch = make_algo("maml", 1), make_batch()
    step = CompiledMetaStep(algo, quiet=True)
    monkeypatch.setattr(step, "_compile", perturbed(float("nan")))
    with pytest.raises(MetalearnError, match="meta-gradient is nan from the eager one"):
        step.meta_step(batch)
    assert all(p.grad is None for p in trained(algo))


# --- what is refused, and how the engine says what it runs ---------------------------------------------------------
def test_engine_plan_says_compiled():
    assert Engine(make_algo(), "loop", compile=True).plan() == (
        "compiled", "torch.compile of the torch.func meta-step, one task at a time")
    engine = Engine(make_algo(), "batched", compile=True)
    assert engine.plan()[0] == "compiled" and "vmap" in engine.plan()[1] and engine.compiled.vmap
    assert Engine(make_algo(), "auto", compile=True).compiled.vmap is False  # auto, CPU, conv4: hybrid -> per task
    assert Engine(make_algo(), "loop").compiled is None


class AdamInner(MAML):
    capabilities = Capabilities(batchable=True, hybrid=True, compile=True)

    def rule(self, lr=None):
        return Adam(self.inner_lr)


def test_refusals_name_the_reason():
    def refused(algo) -> str:
        with pytest.raises(MetalearnError) as e:
            Engine(algo, "loop", compile=True)
        assert str(e.value).startswith("outer.compile: not available: ")
        assert str(e.value).endswith("; run without outer.compile") and "\n" not in str(e.value)
        return str(e.value)

    model = Conv4(1, WAYS, 4, SIZE).double()
    assert "Reptile runs its own per-task step" in refused(ALGORITHMS["reptile"](model, inner_lr=LR, inner_steps=1))
    assert "ANIL's cached features" in refused(ALGORITHMS["anil"](model, inner_lr=LR, inner_steps=1))
    assert "LoRA" in refused(make_algo().use_lora(2))
    assert "inner-loop checkpointing" in refused(make_algo().set_checkpoint(True))
    assert "the inner rule is Adam (SGD only)" in refused(AdamInner(model, inner_lr=LR, inner_steps=1))
    assert "extra per-task parameters" in refused(ALGORITHMS["cavia"](model, inner_lr=LR, inner_steps=1,
                                                                        context_dim=4, film=False))
    mamlpp = ALGORITHMS["mamlpp"](model, inner_lr=LR, inner_steps=2, msl_iterations=10)
    assert "multi-step query loss (MAML++)" in refused(mamlpp)
    for name in ("maml", "fomaml", "boil", "metasgd"):
        assert unsupported(make_algo(name)) is None


def test_meta_step_refuses_autocast():
    step = CompiledMetaStep(make_algo(), quiet=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(MetalearnError, match="not available under autocast"):
            step.meta_step(make_batch())


@pytest.mark.parametrize("overrides,message", [
    (["outer.algorithm=anil"], "outer.compile: available for boil, fomaml, maml, metasgd, not 'anil'"),
    (["outer.algorithm=reptile"], "outer.compile: available for boil, fomaml, maml, metasgd, not 'reptile'"),
    (["inner.checkpoint=true"], "outer.compile: not combined with inner.checkpoint"),
    (["inner.lora_rank=2"], "outer.compile: not combined with inner.lora_rank"),
    (["precision=bf16"], "outer.compile: precision=bf16 is not supported"),
])
def test_config_refuses_what_compile_does_not_support(overrides, message):
    with pytest.raises(MetalearnError, match=message.replace("(", r"\(")):
        apply_overrides(Config(), ["outer.compile=true", *overrides])
    apply_overrides(Config(), ["outer.compile=true"])  # maml: accepted


def test_build_algorithm_passes_outer_compile():
    from metalearn.train import build_algorithm

    cfg = apply_overrides(Config(), ["outer.compile=true", "model.hidden=4", "data.image_size=16"])
    engine = build_algorithm(cfg, Conv4(1, 5, 4, 16))
    assert engine.plan()[0] == "compiled"
    assert build_algorithm(apply_overrides(Config(), []), Conv4(1, 5, 4, 16)).compiled is None


# --- through torch.compile (inductor): minutes with a cold cache ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,steps,first_order,execution", [
    ("maml", 2, False, "loop"),  # second order, per task
    ("metasgd", 1, False, "batched"),  # learned lrs as differentiated inputs, vmapped over tasks
], ids=["maml-2steps-per-task", "metasgd-vmap"])
# First order is not compiled here (a cold inductor cache costs minutes per case on 2 cores): the compiled
# function is the eager functional one, whose first-order case test_eager_functional_meta_step_equals_the_loop
# checks, and the gate compares every first compiled call with it at run time.
def test_compiled_equals_eager_and_the_loop(name, steps, first_order, execution, capsys):
    algo = make_algo(name, steps, first_order)
    engine = Engine(algo, execution, compile=True)
    check_against_loop(algo, engine.meta_step, make_batch())  # gated: compiled against eager
    (distance,) = engine.compiled._checked.values()
    assert distance <= TOL
    err = capsys.readouterr().err
    assert "compiling the meta-step with torch.compile" in err and "compiled the meta-step in" in err
    check_against_loop(algo, engine.meta_step, make_batch(seed=5))  # trusted: the compiled function alone
    batch = make_batch(seed=3)
    want = Engine(algo, "loop").evaluate_batch(batch, steps=steps + 1)
    assert torch.equal(engine.evaluate_batch(batch, steps=steps + 1), want)
    assert len(engine.compiled._checked) == 2 and max(engine.compiled._checked.values()) <= TOL
