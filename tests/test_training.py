"""A short real run on Omniglot, evaluation from its checkpoint, and the confidence interval."""
import json
import math

import pytest
import torch

from metalearn.config import load_config
from metalearn.evaluation import mean_ci95
from metalearn.tracking import read_jsonl
from metalearn.train import train

from test_cli import QUICK, run_cli


def test_mean_ci95_matches_numpy():
    x = torch.tensor([0.2, 0.4, 0.4, 0.8, 1.0], dtype=torch.float64)
    mean, ci = mean_ci95(x)
    a = x.numpy()
    assert mean == pytest.approx(a.mean(), abs=1e-15)
    assert ci == pytest.approx(1.96 * a.std(ddof=1) / math.sqrt(len(a)), abs=1e-15)
    assert mean_ci95(torch.tensor([0.5])) == (0.5, 0.0)


@pytest.fixture(scope="module")
def short_run(data_root, cache_dir, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("METALEARN_DATA", str(data_root))
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(QUICK, ["model.hidden=32", "outer.iterations=150", "eval.episodes=200",
                              f"data.cache_dir={cache_dir}", f"tracking.out_dir={out}", "tracking.name=short",
                              "tracking.progress=false", "tracking.log_every=25"])
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_short_maml_run_beats_chance_clearly(short_run):
    cfg, summary = short_run
    ev = summary["eval"]
    assert ev["split"] == "test" and ev["episodes"] == 200 and len(ev["accuracies"]) == 200
    # 5-way chance is 20%; 150 second-order MAML steps reach ~85% (measured); 70% is a safe floor
    assert ev["mean"] >= 0.70, ev["mean"]
    assert 0 < ev["ci95"] < 0.05


@pytest.mark.slow
def test_run_folder_holds_config_metrics_checkpoint(short_run):
    cfg, summary = short_run
    run = __import__("pathlib").Path(summary["run_dir"])
    assert (run / "config.yaml").is_file() and (run / "checkpoint.pt").is_file()
    rows = read_jsonl(run / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [25, 50, 75, 100, 125, 150]
    assert rows[-1]["test/accuracy"] == pytest.approx(summary["eval"]["mean"])
    first, last = rows[0]["train/accuracy"], rows[steps.index(150)]["train/accuracy"]
    assert last > first
    assert json.loads((run / "eval-test.json").read_text())["eval"]["mean"] == summary["eval"]["mean"]


@pytest.mark.slow
def test_eval_cli_reproduces_the_runs_test_numbers(short_run, data_root, cache_dir):
    cfg, summary = short_run
    ckpt = __import__("pathlib").Path(summary["run_dir"]) / "checkpoint.pt"
    proc = run_cli("eval", str(ckpt), "--episodes", "200", "--no-progress",
                   env={"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    out = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("saved ")][0]
    assert out == str(ckpt.parent / "eval-test-5w1s15q-3steps-lr0.4-transductive-seed0-200ep.json")
    saved = json.loads(__import__("pathlib").Path(out).read_text())["eval"]
    # same fixed episodes, same weights, same device -> the same per-episode accuracies
    assert saved["accuracies"] == summary["eval"]["accuracies"]
    assert f"{100 * saved['mean']:.2f} ±" in proc.stdout
