"""Sinusoid regression end to end (MAML Sec. 5.1): `metalearn train` on the preset learns (test MSE
well below the untrained model's on the same fixed episodes), a SIGKILLed run resumes bit-identically,
`metalearn eval` reproduces and varies the evaluation, and nonsense settings are one-line errors."""
import json
import math
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn.checkpoint import load_checkpoint
from metalearn.cli import main
from metalearn.config import load_config
from metalearn.errors import MetalearnError
from metalearn.evaluation import EvalResult
from metalearn.tracking import read_jsonl

from test_checkpoint_resume import _wait_for_step
from test_cli import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "experiments" / "configs" / "maml_sinusoid.yaml"
FAST = ["eval.episodes=100", "tracking.progress=false", "threads=1", "checkpoint.every=100"]


def _train(tmp_path, name, *extra):
    code = main(["train", str(PRESET), *FAST, f"tracking.out_dir={tmp_path}", f"tracking.name={name}", *extra])
    assert code == 0
    return json.loads((tmp_path / name / "eval-test.json").read_text())["eval"]


def test_train_cli_learns_and_eval_cli_reproduces(tmp_path, capsys):
    untrained = _train(tmp_path, "untrained", "outer.iterations=0")
    trained = _train(tmp_path, "trained", "outer.iterations=300", "eval.val_every=150", "eval.val_episodes=20")
    out = capsys.readouterr().out
    assert "test MSE:" in out and "10-shot sinusoid episodes, 10 inner steps" in out and "accuracy" not in out
    assert trained["metric"] == untrained["metric"] == "mse"
    assert trained["episodes"] == len(trained["accuracies"]) == 100
    # 300 outer steps (about a second on one CPU thread) cut the untrained model's test MSE on the same
    # 100 fixed episodes by more than 40% (measured: 4.31 -> 2.15; deterministic on CPU, seeded)
    assert trained["mean"] < 0.6 * untrained["mean"], (trained["mean"], untrained["mean"])
    paired = torch.tensor(trained["accuracies"]) < torch.tensor(untrained["accuracies"])
    assert paired.double().mean() > 0.6  # better on most episodes, not only on average
    rows = read_jsonl(tmp_path / "trained" / "metrics.jsonl")
    assert "test/mse" in rows[-1] and sum("train/mse" in r for r in rows) == 3  # log_every=100
    val = [r["val/mse"] for r in rows if "val/mse" in r]
    assert len(val) == 2 and val[1] < val[0]  # validation episodes (seed eval.seed + 1), scored twice
    assert (tmp_path / "trained" / "learning_curve.png").stat().st_size > 0

    # eval CLI with the run's own settings gives the training run's numbers exactly
    assert main(["eval", str(tmp_path / "trained"), "--no-progress", "--out", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())["eval"]
    assert same["accuracies"] == trained["accuracies"] and same["mean"] == trained["mean"]
    # K=5 support points, 1 and 10 test-time steps: configurable, and recorded
    scores = {}
    for steps in (1, 10):
        assert main(["eval", str(tmp_path / "trained"), "--shots", "5", "--inner-steps", str(steps),
                     "--no-progress"]) == 0
        name = f"eval-test-5s10q-{steps}step{'' if steps == 1 else 's'}-lr0.01-seed0-100ep.json"  # one file per setting
        saved = json.loads((tmp_path / "trained" / name).read_text())["eval"]
        assert saved["shots"] == 5 and saved["inner_steps"] == steps and saved["metric"] == "mse"
        scores[steps] = saved["mean"]
    assert "test MSE:" in capsys.readouterr().out
    assert scores[10] != scores[1] and scores[1] != trained["mean"], scores


def test_eval_result_metric_field_and_old_json():
    old = {"split": "test", "episodes": 2, "ways": 5, "shots": 1, "query_shots": 15, "inner_steps": 3, "inner_lr": 0.4,
           "seed": 0, "batchnorm": "transductive", "mean": 0.9, "ci95": 0.01, "accuracies": [0.9, 0.9],
           "transductive": True}  # saved before `metric` existed
    r = EvalResult.from_dict(old)
    assert r.metric == "accuracy" and "90.00 ± 1.00%" in r.summary()
    mse = EvalResult.from_dict({**old, "ways": 1, "shots": 10, "mean": 0.51234, "ci95": 0.04, "metric": "mse"})
    assert mse.summary() == "test MSE: 0.5123 ± 0.0400 (95% CI) over 2 10-shot sinusoid episodes, 3 inner steps"


@pytest.mark.parametrize("override, message", [
    ("model.name=conv4", "use model.name=mlp"),
    ("data.ways=5", "data.ways (and eval.ways) must be 1"),
    ("eval.ways=2", "data.ways (and eval.ways) must be 1"),
    ("data.split=vinyals", "sinusoid protocols are maml, reptile"),
    ("data.rotation=per_task", "does not apply to sinusoid"),
    ("outer.algorithm=protonet", "is for classification"),
])
def test_bad_sinusoid_settings_are_one_line_errors(tmp_path, override, message):
    with pytest.raises(MetalearnError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(PRESET, [override])
    if override == "model.name=conv4":  # the same through the CLI: exit 2, one line, nothing written
        proc = run_cli("train", str(PRESET), override, f"tracking.out_dir={tmp_path / 'runs'}")
        assert_one_line_error(proc, message)
        assert not (tmp_path / "runs").exists()


def test_mlp_on_images_is_an_error():
    with pytest.raises(MetalearnError, match="model.name=mlp takes 1-d inputs"):
        load_config(None, ["model.name=mlp"])


def test_reptile_protocol_preset_loads():
    cfg = load_config(REPO / "experiments" / "configs" / "reptile_sinusoid.yaml")
    assert cfg.data.split == "reptile" and cfg.outer.algorithm == "reptile"


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """As tests/test_checkpoint_resume.py, for sinusoid: the sampler's generator is in the checkpoint."""
    steps = 1000
    args = [str(PRESET), f"outer.iterations={steps}", "checkpoint.every=50", "tracking.log_every=1",
            "eval.episodes=20", "tracking.progress=false", "threads=1", "model.hidden=16",
            f"tracking.out_dir={tmp_path}"]
    ref = subprocess.run([sys.executable, "-m", "metalearn", "train", *args, "tracking.name=ref"],
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([sys.executable, "-m", "metalearn", "train", *args, "tracking.name=killed"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, tmp_path / "killed" / "metrics.jsonl", random.randint(100, 400))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = load_checkpoint(tmp_path / "killed")["step"]
    assert 50 <= saved < steps, saved
    resumed = subprocess.run([sys.executable, "-m", "metalearn", "train", str(tmp_path / "killed" / "config.yaml"),
                              "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {saved} of {steps}" in resumed.stderr
    a, b = load_checkpoint(tmp_path / "killed"), load_checkpoint(tmp_path / "ref")
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    losses = lambda p: [(r["step"], r["train/loss"], r["train/mse"]) for r in read_jsonl(p / "metrics.jsonl")  # noqa: E731
                        if "train/loss" in r]
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")
    ev = lambda p: json.loads((p / "eval-test.json").read_text())["eval"]["accuracies"]  # noqa: E731
    assert ev(tmp_path / "killed") == ev(tmp_path / "ref")


def test_list_shows_sinusoid_and_bench_runs_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "regression: sinusoid (data.split = protocol: maml, reptile; model mlp)" in out
    assert "  maml_sinusoid\n      MAML sinusoid regression" in out and "  reptile_sinusoid\n" in out
    assert main(["bench", str(PRESET), "threads=1", "--steps", "3", "--warmup", "1",
                 "--out", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["meta_batch_size"] == 25 and result["tasks_per_s"] > 0


def test_inner_checkpoint_training_is_bit_identical_and_bf16_trains(tmp_path):
    short = ["outer.iterations=20", "inner.steps=3"]
    plain = _train(tmp_path, "plain", *short)
    ckpt = _train(tmp_path, "ckpt", *short, "inner.checkpoint=true")
    assert ckpt["accuracies"] == plain["accuracies"]  # per-episode MSEs, recomputed activations
    bf16 = _train(tmp_path, "bf16", *short, "precision=bf16")
    assert all(math.isfinite(v) for v in bf16["accuracies"]) and bf16["accuracies"] != plain["accuracies"]


@pytest.mark.parametrize("override, message", [
    ("precision=tf32", "precision=tf32 needs a CUDA device"),
    ("outer.algorithm=reptile inner.checkpoint=true", "inner.checkpoint: not available for reptile"),
])
def test_precision_and_checkpoint_refusals_are_one_line_errors(tmp_path, override, message):
    proc = run_cli("train", str(PRESET), *override.split(), f"tracking.out_dir={tmp_path / 'runs'}")
    assert_one_line_error(proc, message)
    assert not (tmp_path / "runs").exists()
