"""Exact resume: a training process killed (SIGKILL) or stopped (SIGINT/SIGTERM) at a random step and
resumed with --resume ends with parameters, optimiser state and logged losses bit-identical to a run
that was never interrupted (real Omniglot, CPU, tiny conv4)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metalearn.checkpoint import load_checkpoint
from metalearn.tracking import read_jsonl

from test_cli import QUICK

STEPS = 60
ARGS = ["model.hidden=8", "outer.meta_batch_size=2", f"outer.iterations={STEPS}", "checkpoint.every=4",
        "data.query_shots=5", "eval.episodes=5", "tracking.log_every=1", "tracking.progress=false", "threads=1"]


def _env(data_root, cache_dir):
    return {**os.environ, "METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)}


def _start(env, out, name, *extra):
    return subprocess.Popen([sys.executable, "-m", "metalearn", "train", str(QUICK), *ARGS,
                             f"tracking.out_dir={out}", f"tracking.name={name}", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, metrics: Path, step: int, timeout: float = 240) -> int:
    """Poll metrics.jsonl until it has logged `step` (or the process ends); returns the last logged step."""
    deadline = time.time() + timeout
    last = 0
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists():
            rows = read_jsonl(metrics, tolerant=True)
            last = rows[-1]["step"] if rows else 0
            if last >= step:
                return last
        time.sleep(0.005)
    raise AssertionError(f"run ended or timed out before step {step} (last logged {last}): {proc.communicate()}")


def _resume(env, run: Path):
    return subprocess.run([sys.executable, "-m", "metalearn", "train", str(run / "config.yaml"), "--resume"],
                          env=env, capture_output=True, text=True, timeout=300)


def _assert_identical(run: Path, reference: Path):
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in b["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(a["optimizer"]["state"][i][key], value), (i, key)
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    losses = lambda p: [(r["step"], r["train/loss"], r["train/accuracy"]) for r in read_jsonl(p / "metrics.jsonl")
                        if "train/loss" in r]
    # every step logged exactly once, with the same values (rows after the last checkpoint were dropped on resume)
    assert losses(run) == losses(reference)
    assert [s for s, _, _ in losses(run)] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def reference(data_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = _start(_env(data_root, cache_dir), out, "ref")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return out / "ref"


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, data_root, cache_dir, tmp_path):
    env = _env(data_root, cache_dir)
    kill_at = random.randint(6, STEPS // 2)
    proc = _start(env, tmp_path, "killed")
    _wait_for_step(proc, tmp_path / "killed" / "metrics.jsonl", kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(tmp_path / "killed")["step"]
    assert 4 <= saved < STEPS and saved % 4 == 0, (kill_at, saved)
    resumed = _resume(env, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {saved} of {STEPS}" in resumed.stderr
    _assert_identical(tmp_path / "killed", reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_sigint_save_exit_cleanly_and_resume_exactly(sig, code, reference, data_root, cache_dir, tmp_path):
    env = _env(data_root, cache_dir)
    proc = _start(env, tmp_path, "stopped")
    _wait_for_step(proc, tmp_path / "stopped" / "metrics.jsonl", random.randint(5, STEPS // 2))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and f"{sig.name} at step" in stderr and "--resume" in stderr
    saved = load_checkpoint(tmp_path / "stopped")["step"]
    last_logged = read_jsonl(tmp_path / "stopped" / "metrics.jsonl")[-1]["step"]
    assert saved == last_logged < STEPS  # the step in progress was finished and saved, nothing more
    assert not (tmp_path / "stopped" / "eval-test.json").exists()
    resumed = _resume(env, tmp_path / "stopped")
    assert resumed.returncode == 0, resumed.stderr
    _assert_identical(tmp_path / "stopped", reference)
