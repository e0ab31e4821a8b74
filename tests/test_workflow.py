"""Presets, sweep file, --help, list and `metalearn eval` on a checkpoint."""
import json
from pathlib import Path

import pytest
import yaml

from metalearn.ablate import load_ablation
from metalearn.cli import main
from metalearn.config import Config, load_config, to_dict
from metalearn.errors import MetalearnError
from metalearn.train import _flatten, train

from test_checkpoint import TINY
from test_cli import QUICK, REPO

PRESETS = sorted((REPO / "experiments" / "configs").glob("*.yaml"))
ABLATIONS = sorted((REPO / "experiments" / "ablations").glob("*.yaml"))
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    # presets only override defaults: every key they set is a real key with a value that differs or restates
    set_keys = _flatten(yaml.safe_load(preset.read_text()))
    assert set(set_keys) <= set(_flatten(to_dict(cfg)))


def test_paper_presets_have_the_papers_hyperparameters():
    five = load_config(REPO / "experiments/configs/maml_omniglot_5w1s.yaml")
    assert (five.inner.lr, five.inner.steps, five.outer.meta_batch_size, five.eval.inner_steps) == (0.4, 1, 32, 3)
    assert (five.outer.lr, five.outer.iterations, five.model.hidden, five.eval.episodes) == (1e-3, 60000, 64, 600)
    twenty = load_config(REPO / "experiments/configs/maml_omniglot_20w5s.yaml")
    assert (twenty.data.ways, twenty.data.shots, twenty.inner.lr, twenty.inner.steps, twenty.outer.meta_batch_size) == \
        (20, 5, 0.1, 5, 16)
    assert load_config(REPO / "experiments/configs/fomaml_omniglot_5w1s.yaml").outer.algorithm == "fomaml"


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda p: p.name)
def test_every_ablation_file_validates(ablation, tmp_path):
    ab = load_ablation(ablation, seeds=2, out_dir=tmp_path)
    assert 2 <= len(ab.cells) and all(len(c.configs) == 2 for c in ab.cells)
    assert all(cfg.tracking.wandb.group == ablation.stem for c in ab.cells for cfg in c.configs)
    assert not list(tmp_path.iterdir())  # validation writes nothing


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_parameters_are_config_keys(sweep):
    spec = yaml.safe_load(sweep.read_text())
    cmd = spec["command"]
    assert cmd[:5] == ["${env}", "python", "-m", "metalearn", "train"] and cmd[-1] == "${args_no_hyphens}"
    preset, fixed = cmd[5], [c for c in cmd[6:-1]]
    assert "tracking.wandb.enabled=true" in fixed
    for key, p in spec["parameters"].items():
        for value in p.get("values", [p.get("min"), p.get("max")]):
            v = str(value).lower() if isinstance(value, bool) else value
            load_config(REPO / preset, [*fixed, f"{key}={v}"])
    cfg = load_config(REPO / preset, fixed)
    assert spec["metric"]["name"] == "val/accuracy" and cfg.eval.val_every > 0  # a metric the run logs


def test_help_documents_every_option(capsys):
    for cmd in ["train", "eval", "ablate", "list"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: metalearn " + cmd)
        if cmd == "train":
            for key in _flatten(to_dict(Config())):
                assert f"\n  {key}: " in text, key
            assert "--resume" in text
        if cmd == "eval":
            for opt in ["--split", "--episodes", "--ways", "--shots", "--query-shots", "--inner-steps", "--inner-lr",
                        "--seed", "--out"]:
                assert opt in text
        if cmd == "ablate":
            assert "--seeds" in text and "--dry-run" in text


def test_list_shows_presets_ablations_sweeps(capsys):
    assert main(["list", "--root", str(REPO)]) == 0
    out = capsys.readouterr().out
    for f in PRESETS + ABLATIONS + SWEEPS:
        assert f"  {f.stem}\n" in out  # listed by the name that `metalearn train NAME` takes
    # full descriptions, not only their first line
    from metalearn.presets import description

    preset = REPO / "experiments" / "configs" / "maml_omniglot_5w1s.yaml"
    last_line = preset.read_text().splitlines()[5]
    assert last_line.startswith("#") and description(preset).endswith(last_line.lstrip("# ").strip())
    assert " ".join(last_line.lstrip("# ").split()[-3:]) in " ".join(out.split())
    assert "maml" in out and "omniglot" in out and "conv4" in out


@pytest.fixture(scope="module")
def tiny_run(data_root, cache_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METALEARN_DATA", str(data_root))
        mp.setenv("METALEARN_CACHE", str(cache_dir))
        out = tmp_path_factory.mktemp("runs")
        yield train(load_config(QUICK, [*TINY, f"tracking.out_dir={out}", "tracking.name=tiny"]))


@pytest.mark.slow
def test_eval_cli_any_protocol_prints_and_saves_mean_ci(tiny_run, data_root, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METALEARN_DATA", str(data_root))
    monkeypatch.setenv("METALEARN_CACHE", str(cache_dir))
    run = Path(tiny_run["run_dir"])
    out = tmp_path / "ev.json"
    assert main(["eval", str(run), "--split", "val", "--episodes", "12", "--ways", "5", "--shots", "5",
                 "--inner-steps", "2", "--no-progress", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    ev = saved["eval"]
    assert (ev["split"], ev["episodes"], ev["ways"], ev["shots"], ev["inner_steps"]) == ("val", 12, 5, 5, 2)
    assert saved["step"] == 10 and len(ev["accuracies"]) == 12
    assert f"{100 * ev['mean']:.2f} ± {100 * ev['ci95']:.2f}%" in capsys.readouterr().out
    # the default output path sits next to the checkpoint and repeats the same numbers for the same episodes
    assert main(["eval", str(run / "checkpoint.pt"), "--split", "val", "--episodes", "12", "--shots", "5",
                 "--inner-steps", "2", "--no-progress"]) == 0
    again = json.loads(next(run.glob("eval-val-5w5s15q-2steps-lr*-transductive-seed0-12ep.json")).read_text())["eval"]
    assert again["accuracies"] == ev["accuracies"]


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metalearn: error:") and match in err[0], err


@pytest.mark.slow
def test_eval_cli_bad_input(tiny_run, tmp_path, capsys):
    _one_line_error(capsys, ["eval", str(Path(tiny_run["run_dir"]) / "checkpoint.pt"), "--ways", "7"],
                    "--ways 7: this checkpoint's head has 5 outputs")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _one_line_error(capsys, ["eval", str(tmp_path / "junk.pt")], "is not a readable metalearn checkpoint")
    _one_line_error(capsys, ["eval", str(tmp_path / "none.pt")], "checkpoint not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]


def test_train_bad_input_writes_nothing(tmp_path, capsys):
    with pytest.raises(MetalearnError, match="checkpoint.every must be >= 0"):
        load_config(QUICK, ["checkpoint.every=-1"])
    choices = r"tracking.wandb.mode: Invalid value 'sometimes', expected one of \[online, offline, disabled\]"
    with pytest.raises(MetalearnError, match=choices):
        load_config(QUICK, ["tracking.wandb.mode=sometimes"])
    with pytest.raises(MetalearnError, match="tracking.wandb.enabled"):
        load_config(QUICK, ["tracking.wandb.enabled=maybe"])
    _one_line_error(capsys, ["train", str(QUICK), f"tracking.out_dir={tmp_path}/r", "--resume"],
                    "--resume needs the run's name")
    _one_line_error(capsys, ["train", str(QUICK), f"tracking.out_dir={tmp_path}/r", "tracking.name=x", "--resume"],
                    "does not exist")
    assert not (tmp_path / "r").exists()


def test_bench_measures_and_saves_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(QUICK), "model.hidden=8", "outer.meta_batch_size=2", "threads=1", "--steps", "2",
                 "--warmup", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["steps"] == 2 and r["meta_batch_size"] == 2 and r["images"] == [1, 28, 28] and r["torch"]
    assert r["seconds"] > 0 and r["tasks_per_s"] == pytest.approx(2 * 2 / r["seconds"])
    assert "tasks/s" in capsys.readouterr().out


def test_overrides_may_follow_options(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", str(QUICK), "--steps", "1", "--warmup", "0", "model.hidden=8", "--out", str(out),
                 "outer.meta_batch_size=1", "threads=1"]) == 0
    r = json.loads(out.read_text())
    assert r["model"]["hidden"] == 8 and r["meta_batch_size"] == 1
    with pytest.raises(SystemExit):
        main(["bench", str(QUICK), "--steps", "1", "--bogus"])
