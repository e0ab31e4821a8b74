"""benchmarks/behaviour_record.py: record then compare reproduces bit-identically; a changed result is caught."""
import json

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("behaviour_record")


def test_record_then_compare_round_trip(script, data_root, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METALEARN_CACHE", str(cache_dir))
    out = tmp_path / "record.json"
    assert script.main(["record", "--only", "maml,sinusoid", "--steps", "2", "--episodes", "5", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert set(rec["runs"]) == {f"{a}/{m}" for a in ("maml", "sinusoid") for m in ("loop", "batched", "hybrid", "auto")}
    run = rec["runs"]["maml/loop"]
    assert run["status"] == "ran" and run["plan"] == "loop" and run["step"] == 2 and len(run["episodes"]) == 5
    assert rec["runs"]["maml/auto"]["plan"] == "hybrid" and rec["runs"]["sinusoid/auto"]["plan"] == "batched"
    assert rec["torch"] and rec["threads"] == 1 and rec["commit"] and "record" in rec["command"]

    assert script.main(["compare", "--against", str(out), "--only", "maml"]) == 0
    assert "4 of 4 runs identical" in capsys.readouterr().out

    # a changed parameter and a changed episode score are both reported, and fail
    run["params_sha256"] = "0" * 64
    run["tensors"]["head.bias"] = "0" * 64
    run["episodes"][3] += 1e-12
    out.write_text(json.dumps(rec))
    assert script.main(["compare", "--against", str(out), "--only", "maml/loop"]) == 1
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.startswith("maml/loop") and "DIFFERS" in line)
    assert "head.bias" in line and "episode 3" in line


def test_one_line_errors(script, tmp_path, capsys):
    assert script.main(["compare", "--against", str(tmp_path / "missing.json")]) == 2
    assert script.main(["record", "--only", "mam", "--out", str(tmp_path / "r.json")]) == 2
    assert script.main(["record", "--only", "maml/fast", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("behaviour_record: error:") for line in err)


def test_rename_moves_a_config_key(script):
    assert script.renamed(["outer.msl_iterations=10", "seed=0"], {"outer.msl_iterations": "mamlpp.msl_iterations"}) == [
        "mamlpp.msl_iterations=10", "seed=0"]


def test_hidden_sets_conv4s_filters_of_the_omniglot_runs_only(script):
    runs = {r["id"]: r["overrides"] for r in script.planned_runs(20, 50, ["maml/hybrid", "sinusoid/loop"], hidden=64)}
    assert "model.hidden=64" in runs["maml/hybrid"] and not any("hidden" in o for o in runs["sinusoid/loop"])
    assert "model.hidden=16" in script.planned_runs(20, 50, ["maml/loop"])[0]["overrides"]  # the default
