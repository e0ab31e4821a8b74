"""Checkpoint contents, atomic writes, RNG round trips, NaN/inf stops and resume guards (in process)."""
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import metalearn.train as train_module
from metalearn._io import atomic_write
from metalearn.checkpoint import load_checkpoint, rng_state, set_rng_state
from metalearn.config import load_config
from metalearn.errors import MetalearnError
from metalearn.tracking import read_jsonl
from metalearn.train import train

from test_cli import QUICK

TINY = ["model.hidden=8", "outer.meta_batch_size=2", "outer.iterations=10", "checkpoint.every=3", "data.query_shots=5",
        "eval.episodes=5", "tracking.log_every=1", "tracking.progress=false", "threads=1"]


@pytest.fixture
def tiny(data_root, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("METALEARN_DATA", str(data_root))
    monkeypatch.setenv("METALEARN_CACHE", str(cache_dir))
    return lambda name, *extra: load_config(QUICK, [*TINY, f"tracking.out_dir={tmp_path}", f"tracking.name={name}",
                                                    *extra])


def test_atomic_write_interrupted_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old, complete")

    def torn(f):
        f.write(b"half of a new fi")
        raise KeyboardInterrupt  # e.g. a signal in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, torn)
    assert target.read_bytes() == b"old, complete"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    random.gauss(0, 1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    draws = lambda: (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                     torch.rand(3).tolist())
    expected = draws()
    draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


@pytest.mark.slow
def test_checkpoint_holds_every_state_and_loads_weights_only(tiny):
    summary = train(tiny("full"))
    run = Path(summary["run_dir"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["config"]["outer"]["iterations"] == 10
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"} and "generator" in ckpt["sampler"]
    assert ckpt["optimizer"]["state"] and {"features.0.conv.weight", "head.weight"} <= set(ckpt["model"])
    assert len(ckpt["git"]["commit"]) == 40  # the repository's commit, also in run.json
    assert (run / "config.yaml").is_file() and (run / "learning_curve.png").stat().st_size > 1000
    assert "commit" in (run / "run.json").read_text()
    # a finished run cannot be overwritten by accident, and a resume must not change the training setup
    with pytest.raises(MetalearnError, match="already holds a run"):
        train(tiny("full"))
    with pytest.raises(MetalearnError, match=r"--resume: inner.lr is 0.1 but the checkpoint was trained with 0.4"):
        train(tiny("full", "inner.lr=0.1"), resume=True)
    with pytest.raises(MetalearnError, match="does not exist"):
        train(tiny("never-ran"), resume=True)


def _inject(monkeypatch, at_step: int, what: str):
    build = train_module.build_algorithm

    def build_with_fault(cfg, model):
        algorithm = build(cfg, model)
        meta_step, calls = algorithm.meta_step, []

        def faulty(batch):
            metrics = meta_step(batch)
            calls.append(1)
            if len(calls) == at_step:
                if what == "grad":
                    model.get_parameter("features.2.conv.weight").grad.view(-1)[5] = float("nan")
                else:
                    metrics = {**metrics, "loss": float("inf")}
            return metrics

        algorithm.meta_step = faulty
        return algorithm

    monkeypatch.setattr(train_module, "build_algorithm", build_with_fault)


@pytest.mark.slow
def test_nan_gradient_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny, monkeypatch):
    _inject(monkeypatch, at_step=8, what="grad")
    cfg = tiny("nan")
    with pytest.raises(MetalearnError, match=r"non-finite gradient of features\.2\.conv\.weight at step 8; .*"
                                             r"last good checkpoint \(step 6\) is kept"):
        train(cfg)
    run = Path(cfg.tracking.out_dir) / "nan"
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 7 and not (run / "eval-test.json").exists()


@pytest.mark.slow
def test_inf_loss_before_any_checkpoint(tiny, monkeypatch):
    _inject(monkeypatch, at_step=2, what="loss")
    with pytest.raises(MetalearnError,
                       match=r"non-finite meta-loss \(inf\) at step 2; .*no checkpoint had been written"):
        train(tiny("inf"))


def _compare_states(a, b, where=""):
    """Recursively: same keys, bit-identical tensors, equal builtins."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _compare_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _compare_states(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def sigint_during_step(build, n):
    """A build_algorithm whose algorithm sends this process SIGINT during its n-th meta_step
    (train() handles it after that step: checkpoint, stop)."""

    def interrupting(cfg, model):
        algo = build(cfg, model)
        meta_step, calls = algo.meta_step, []

        def step(batch):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGINT)
            return meta_step(batch)

        algo.meta_step = step
        return algo

    return interrupting


@pytest.mark.parametrize("algorithm", ["metasgd", "reptile", "mamlpp"])
def test_interrupt_then_resume_is_exact_for_algorithms_with_state(algorithm, tiny, monkeypatch):
    """Learned inner lrs (Meta-SGD, MAML++), schedules (MAML++, Reptile) and their optimiser state survive a
    SIGINT at step 5 and a resume: the final checkpoint equals an uninterrupted run's, bit for bit."""
    extra = (f"outer.algorithm={algorithm}",)
    train(tiny("straight", *extra))
    build = train_module.build_algorithm
    monkeypatch.setattr(train_module, "build_algorithm", sigint_during_step(build, 5))
    part = train(tiny("resumed", *extra))
    assert part["interrupted"] == "SIGINT" and part["step"] == 5 and load_checkpoint(part["run_dir"])["step"] == 5
    monkeypatch.setattr(train_module, "build_algorithm", build)
    done = train(tiny("resumed", *extra), resume=True)
    a, b = load_checkpoint(done["run_dir"]), load_checkpoint(Path(done["run_dir"]).parent / "straight")
    for key in ("step", "model", "algorithm", "optimizer", "sampler"):
        _compare_states(a[key], b[key], key)
    if algorithm != "reptile":
        assert a["algorithm"], "expected learned inner lrs in the checkpoint"
