"""benchmarks/gpu_checks.sh, the one command a session lent a GPU runs, in its CPU dry-run mode: every
step runs (tiny) and leaves its result file, so the script is known to work before device time is spent."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_checks_dry_run_produces_every_result(tmp_path, data_root, cache_dir):
    env = {**os.environ, "DRY_RUN": "1", "REPRO": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0 and "== " in log and "done" in log.splitlines()[-1], proc.stdout + proc.stderr
    assert "passed" in log and "failed" not in log, log
    bench = json.loads((tmp_path / "meta_step_cpu.json").read_text())
    assert bench["results"] and bench["complete"], bench
    assert {r["path"] for r in bench["results"]} >= {"loop", "batched", "hybrid"}, bench
    assert json.loads((tmp_path / "precision_cpu.json").read_text())["results"]
    assert json.loads((tmp_path / "precision_real_cpu.json").read_text())["results"]
    for name in ("meta_step_cpu_resnet12_5step.json", "meta_step_cpu_compiled.json"):
        assert json.loads((tmp_path / name).read_text())["complete"], name
    result = json.loads((tmp_path / "maml_omniglot_5w1s-seed0.json").read_text())
    assert result["preset"] == "maml_omniglot_5w1s" and len(result["values"]) == 4
    assert (tmp_path / "maml_run.tgz").stat().st_size > 0
