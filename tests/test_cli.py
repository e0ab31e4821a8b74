"""The command line: bad input gives one clear line and exit code 2, and leaves nothing behind."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metalearn.config import load_config
from metalearn.errors import MetalearnError

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "experiments" / "configs" / "omniglot_5w1s_quick.yaml"


def run_cli(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "metalearn", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=900)


def assert_one_line_error(proc, match):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("metalearn: error:") and match in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_data_folder(tmp_path):
    proc = run_cli("train", str(QUICK), f"tracking.out_dir={tmp_path / 'runs'}",
                   env={"METALEARN_DATA": str(tmp_path / "no-such-folder")})
    assert_one_line_error(proc, "does not exist")
    assert not (tmp_path / "runs").exists()


def test_unset_data_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "METALEARN_DATA"}
    proc = subprocess.run([sys.executable, "-m", "metalearn", "train", str(QUICK), f"tracking.out_dir={tmp_path}/r"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(proc, "METALEARN_DATA")


def test_unknown_config_key(tmp_path):
    proc = run_cli("train", str(QUICK), "inner.lrr=0.1", f"tracking.out_dir={tmp_path}/r")
    assert_one_line_error(proc, "inner.lrr")


def test_wrong_type(tmp_path):
    proc = run_cli("train", str(QUICK), "outer.meta_batch_size=many", f"tracking.out_dir={tmp_path}/r")
    assert_one_line_error(proc, "outer.meta_batch_size")


def test_missing_config_file(tmp_path):
    proc = run_cli("train", str(tmp_path / "nope.yaml"))
    assert_one_line_error(proc, "config file not found")


def test_more_ways_than_classes(data_root, cache_dir, tmp_path):
    proc = run_cli("train", str(QUICK), "data.ways=101", "eval.split=val", f"tracking.out_dir={tmp_path / 'runs'}",
                   env={"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)})
    assert_one_line_error(proc, "ways=101 is more than the 100 classes in the val split")
    assert not (tmp_path / "runs").exists()


def test_more_shots_and_queries_than_drawings(data_root, cache_dir, tmp_path):
    proc = run_cli("train", str(QUICK), "data.shots=6", "data.query_shots=15", f"tracking.out_dir={tmp_path / 'runs'}",
                   env={"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)})
    assert_one_line_error(proc, "6 + 15 = 21 is more than the 20 examples per class")
    assert not (tmp_path / "runs").exists()


def test_config_validation_in_process():
    cfg = load_config(QUICK, ["inner.adapt=[head.*]", "outer.iterations=7"])
    assert cfg.inner.adapt == ["head.*"] and cfg.outer.iterations == 7 and cfg.data.ways == 5
    with pytest.raises(MetalearnError, match="inner.lr must be > 0"):
        load_config(QUICK, ["inner.lr=-1"])
    with pytest.raises(MetalearnError, match="not of the form key=value"):
        load_config(QUICK, ["inner.lr"])
    with pytest.raises(MetalearnError, match="unknown data set"):
        load_config(QUICK, ["data.dataset=mnist"])


def test_list_and_help():
    proc = run_cli("list", cwd=REPO)
    assert proc.returncode == 0 and "omniglot" in proc.stdout and "  omniglot_5w1s_quick\n" in proc.stdout
    proc = run_cli("train", "--help")
    assert proc.returncode == 0 and "key=value" in proc.stdout


def test_shipped_preset_by_name_from_any_folder(tmp_path, data_root, cache_dir):
    """Presets ship as package data: `metalearn train NAME` works outside the repository; a wrong name
    is one line listing the shipped presets; a path still works (the other tests use paths)."""
    env = {"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)}
    proc = run_cli("train", "omniglot_5w1s_quick", "outer.iterations=1", "eval.episodes=2", "model.hidden=8",
                   "threads=1", "tracking.progress=false", "tracking.out_dir=runs", "tracking.name=byname",
                   env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "byname" / "config.yaml").is_file()
    bad = run_cli("train", "omniglot_5w1s_quik", env=env, cwd=tmp_path)
    assert_one_line_error(bad, "omniglot_5w1s_quick")
    listed = run_cli("list", cwd=tmp_path)
    assert listed.returncode == 0 and "  omniglot_5w1s_quick\n" in listed.stdout and "first_order" in listed.stdout
