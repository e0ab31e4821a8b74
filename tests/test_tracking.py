"""Tracking: metrics.jsonl always, the tqdm bar, W&B only when enabled (read back from an offline run)."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from metalearn.config import load_config
from metalearn.tracking import JsonlTracker, read_jsonl
from metalearn.train import train

from test_checkpoint import TINY, sigint_during_step
from test_cli import QUICK, REPO


def test_jsonl_resume_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    t = JsonlTracker(path)
    for step in range(1, 6):
        t.log(step, {"train/loss": 1.0 / step, "bad": float("nan")})
    t.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "train/lo')  # killed in the middle of a line
    assert [r["step"] for r in read_jsonl(path, tolerant=True)] == [1, 2, 3, 4, 5]
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)
    t = JsonlTracker(path, keep_until=3)
    t.log(4, {"train/loss": 0.0})
    t.close()
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["train/loss"] == 0.0 and rows[0]["bad"] is None


@pytest.mark.slow
def test_cli_progress_bar_and_no_wandb_import_when_disabled(data_root, cache_dir, tmp_path):
    code = ("import sys; from metalearn.cli import main; rc = main(sys.argv[1:]); "
            "assert 'wandb' not in sys.modules, 'wandb imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "train", str(QUICK), *TINY, "tracking.progress=true",
                           f"tracking.out_dir={tmp_path}", "tracking.name=bar"], capture_output=True, text=True,
                          timeout=300, cwd=REPO,
                          env={**os.environ, "METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    bar = proc.stderr.replace("\r", "\n")
    assert "meta-train: 100%" in bar and "10/10 [" in bar  # tqdm: count, elapsed<ETA
    assert "loss=" in bar and "acc=" in bar and "tasks_s=" in bar
    assert "test accuracy:" in proc.stdout
    assert not list(tmp_path.rglob("wandb"))


def flushed_wandb_records(path: Path, timeout: float = 120.0) -> list:
    """The records of an offline run's log once W&B has written all of it: after `wandb.teardown()` (which
    waits for W&B's service process), poll until the log holds its run record and its exit record. Under
    load the service can still be writing when `run.finish()` has returned (a log without a run record yet)."""
    import time

    import wandb

    wandb.teardown()
    deadline, kinds = time.monotonic() + timeout, []
    while True:
        try:
            records = wandb_records(path)
            kinds = [r.WhichOneof("record_type") for r in records]
            if "run" in kinds and "exit" in kinds:
                return records
        except Exception:  # a record still being written: read again
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} holds no complete run after {timeout:.0f} s (record types {kinds})")
        time.sleep(0.2)


def wandb_records(path: Path) -> list:
    """Decode a W&B offline transaction log (run-<id>.wandb): a 7-byte header, then 32 KiB blocks of
    records with a (crc32, uint16 length, uint8 type) header, type 1 = full, 2/3/4 = first/middle/last."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_eval_figure_and_checkpoint(data_root, cache_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("METALEARN_DATA", str(data_root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    cfg = load_config(QUICK, [*TINY, f"data.cache_dir={cache_dir}", f"tracking.out_dir={tmp_path}", "tracking.name=wb",
                              "tracking.wandb.enabled=true", "tracking.wandb.project=ml-test",
                              "tracking.wandb.group=grp", "tracking.wandb.tags=[a,b]"])
    summary = train(cfg)
    import wandb

    wandb.teardown()  # wait until W&B's service process has written out the offline log
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    records = flushed_wandb_records(runs[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    run_records = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_records, f"no run record in {runs[0]} ({runs[0].stat().st_size} bytes): record types {kinds}"
    run = run_records[0]
    assert run.project == "ml-test" and run.run_group == "grp"
    assert list(run.tags) == ["a", "b"] and run.display_name == "wb"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["outer"]["iterations"] == 10 and config["model"]["hidden"] == 8

    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    jsonl = [r for r in read_jsonl(Path(summary["run_dir"]) / "metrics.jsonl") if "train/loss" in r]
    logged = [h for h in history if "train/loss" in h]
    assert [(h["_step"], h["train/loss"]) for h in logged] == [(r["step"], r["train/loss"]) for r in jsonl]
    final = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
    assert final["test/accuracy"] == summary["eval"]["mean"] and final["test/ci95"] == summary["eval"]["ci95"]
    assert any("learning_curve/_type" in h for h in history)
    assert list(runs[0].parent.glob("files/media/images/learning_curve_*.png"))
    artifact = next(r.artifact for r in records if r.WhichOneof("record_type") == "artifact")
    assert artifact.type == "model" and artifact.name == f"checkpoint-{run.run_id}"
    assert [e.path for e in artifact.manifest.contents] == ["checkpoint.pt"]
    assert "exit" in kinds


@pytest.mark.slow
def test_wandb_resume_continues_the_same_run(data_root, cache_dir, tmp_path, monkeypatch):
    """SIGINT at step 4, --resume: the W&B run id is kept (from the checkpoint) and the steps continue 5..10."""
    pytest.importorskip("wandb")
    import metalearn.train as train_module

    for k, v in {"METALEARN_DATA": data_root, "METALEARN_CACHE": cache_dir, "WANDB_MODE": "offline",
                 "WANDB_DIR": tmp_path / "wd", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, str(v))
    (tmp_path / "wd").mkdir()
    build = train_module.build_algorithm
    cfg = load_config(QUICK, [*TINY, f"tracking.out_dir={tmp_path}", "tracking.name=r", "tracking.wandb.enabled=true"])
    monkeypatch.setattr(train_module, "build_algorithm", sigint_during_step(build, 4))
    assert train(cfg)["interrupted"] == "SIGINT"
    monkeypatch.setattr(train_module, "build_algorithm", build)
    train(cfg, resume=True)
    import wandb

    wandb.teardown()  # wait for W&B's service process before looking for its files
    logs = sorted((tmp_path / "wd" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2
    ids, steps = [], []
    for log in logs:
        records = flushed_wandb_records(log)  # only once W&B has written the whole run (flaky under load before)
        ids.append(next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run"))
        steps.append([json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
                      for i in r.history.item if list(i.nested_key) == ["_step"]])
    assert ids[0] == ids[1]
    assert steps[0] == [1, 2, 3, 4] and steps[1][:6] == [5, 6, 7, 8, 9, 10]
