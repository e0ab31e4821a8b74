"""Faults and bad input (issue 19): every bad input is one line `metalearn: error: ...`, exit code 2 and
no file written; non-finite values never reach a checkpoint or an evaluation; eval never writes or deletes
where a checkpoint's config points; resume acts on the folder named; signals end with a message."""
import dataclasses
import errno
import os
import shutil
import signal
import stat
import zipfile
from pathlib import Path

import pytest
import torch

import metalearn.train as train_module
from metalearn import cli
from metalearn._io import atomic_json, atomic_torch_save
from metalearn.checkpoint import load_checkpoint
from metalearn.config import Config, load_config
from metalearn.errors import MetalearnError
from metalearn.tracking import read_jsonl

from test_cli import QUICK, run_cli

SINUSOID = QUICK.parent / "maml_sinusoid.yaml"  # beside the quick preset, wherever test_cli finds it
SIN = ["outer.iterations=2", "outer.meta_batch_size=2", "eval.episodes=2", "eval.batch_size=2", "model.hidden=8",
       "threads=1", "tracking.progress=false", "checkpoint.every=1"]
OMNI = ["outer.iterations=2", "outer.meta_batch_size=2", "data.query_shots=2", "eval.episodes=2", "eval.query_shots=2",
        "eval.batch_size=2", "model.hidden=8", "threads=1", "tracking.progress=false"]


def snapshot(root: Path) -> dict:
    """Every file and folder under root: relative path -> (kind, size, mtime_ns, mode)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def assert_one_line_error(proc, match=""):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("metalearn: error:") and match in lines[0], lines[0]


# --- shared inputs: a finished sinusoid run, a finished tiny Omniglot run, damaged Omniglot zips -----------

@pytest.fixture(scope="module")
def sin_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sin")
    proc = run_cli("train", str(SINUSOID), *SIN, f"tracking.out_dir={out}", "tracking.name=r")
    assert proc.returncode == 0, proc.stderr
    return out / "r"


@pytest.fixture(scope="module")
def omni_run(data_root, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("omni")
    proc = run_cli("train", str(QUICK), *OMNI, f"tracking.out_dir={out}", "tracking.name=r",
                   env={"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    return out / "r"


def _damaged_omniglot(data_root: Path, folder: Path, how: str) -> Path:
    """A copy of $METALEARN_DATA/omniglot whose background zip has its first drawing (the first decoded)
    damaged: `deflate` = garbage in the member's compressed bytes, `png` = a member that is no PNG."""
    dst = folder / "omniglot"
    dst.mkdir(parents=True)
    src = data_root / "omniglot"
    os.symlink(src / "images_evaluation.zip", dst / "images_evaluation.zip")
    with zipfile.ZipFile(src / "images_background.zip") as zin:
        infos = zin.infolist()
        first = min((i for i in infos if i.filename.endswith(".png")), key=lambda i: i.filename)
        if how == "png":
            with zipfile.ZipFile(dst / "images_background.zip", "w") as zout:
                for info in infos:
                    zout.writestr(info, b"this is not a PNG" if info is first else zin.read(info))
            return folder
    shutil.copy(src / "images_background.zip", dst / "images_background.zip")
    with open(dst / "images_background.zip", "r+b") as f:
        f.seek(first.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(first.header_offset + 30 + name_len + extra_len + 2)
        f.write(bytes(range(7, 7 + min(200, first.compress_size - 4))))
    return folder


@pytest.fixture(scope="module")
def damaged(data_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("damaged")
    return {how: _damaged_omniglot(data_root, base / how, how) for how in ("deflate", "png")}


def _crafted(tmp: Path, ckpt_path: Path, edit) -> Path:
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt = edit(ckpt)
    path = tmp / "crafted.pt"
    torch.save(ckpt, path)
    return path


def _drop_key(ckpt):
    del ckpt["model"][next(iter(ckpt["model"]))]
    return ckpt


def _wrong_shape(ckpt):
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3, 3)
    return ckpt


def _no_step(ckpt):
    del ckpt["step"]
    return ckpt


def _inf_param(ckpt):
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name].clone().fill_(float("inf"))
    return ckpt


def _nan_lr(ckpt):
    ckpt["config"]["inner"]["lr"] = float("nan")
    return ckpt


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


# Each case: (id, match, setup(tmp, ctx) -> (args, env)). `tmp` is the folder the snapshot covers.
def _train(tmp, *extra, config=SINUSOID):
    return ["train", str(config), *SIN, f"tracking.out_dir={tmp / 'runs'}", "tracking.name=r", *extra]


def _omni_train(tmp, ctx, how):
    env = {"METALEARN_DATA": str(ctx["damaged"][how]), "METALEARN_CACHE": str(tmp / "cache")}
    return ["train", str(QUICK), *OMNI, f"tracking.out_dir={tmp / 'runs'}", "tracking.name=r"], env


def _yaml_list(tmp, ctx):
    (tmp / "list.yaml").write_text("- data\n- model\n")
    return ["train", str(tmp / "list.yaml")], {}


def _under_file(tmp, ctx):
    (tmp / "afile").write_text("x")
    return ["train", str(SINUSOID), *SIN, f"tracking.out_dir={tmp / 'afile' / 'runs'}"], {}


def _empty_ckpt(tmp, ctx):
    (tmp / "empty.pt").write_bytes(b"")
    return ["eval", str(tmp / "empty.pt")], {}


def _list_ckpt(tmp, ctx):
    torch.save([1, 2, 3], tmp / "list.pt")
    return ["eval", str(tmp / "list.pt")], {}


def _evil_ckpt(tmp, ctx):
    torch.save({"format": 2, "x": _Evil()}, tmp / "evil.pt")
    return ["eval", str(tmp / "evil.pt")], {}


def _edited(edit):
    return lambda tmp, ctx: (["eval", str(_crafted(tmp, ctx["sin_run"] / "checkpoint.pt", edit))], {})


def _out_under_file(tmp, ctx):
    (tmp / "afile").write_text("x")
    return ["eval", str(ctx["sin_run"]), "--out", str(tmp / "afile" / "result.json")], {}


def _wandb_no_key(tmp, ctx):
    pytest.importorskip("wandb")
    home = ctx["home"]
    env = {"HOME": str(home), "WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data"), "NETRC": str(home / "no-netrc"), "WANDB_SILENT": "true"}
    return _train(tmp, "tracking.wandb.enabled=true"), env


CASES = [
    ("corrupt-deflate-member", "cannot decode", lambda tmp, ctx: _omni_train(tmp, ctx, "deflate")),
    ("unreadable-png", "cannot decode", lambda tmp, ctx: _omni_train(tmp, ctx, "png")),
    ("image-size-8", "data.image_size", lambda tmp, ctx: (["train", str(QUICK), *OMNI, "data.image_size=8",
                                                           f"tracking.out_dir={tmp / 'runs'}"], {})),
    ("outer-lr-nan", "outer.lr", lambda tmp, ctx: (_train(tmp, "outer.lr=nan"), {})),
    ("inner-lr-inf", "inner.lr", lambda tmp, ctx: (_train(tmp, "inner.lr=inf"), {})),
    ("final-lr-minus-inf", "reptile.final_lr", lambda tmp, ctx: (_train(tmp, "reptile.final_lr=-inf"), {})),
    ("yaml-top-level-list", "top level", _yaml_list),
    ("out-dir-under-a-file", "is a file", _under_file),
    ("zero-byte-checkpoint", "not a readable", _empty_ckpt),
    ("checkpoint-not-a-dict", "not a metalearn checkpoint", _list_ckpt),
    ("checkpoint-missing-key", "does not fit", _edited(_drop_key)),
    ("checkpoint-wrong-shape", "does not fit", _edited(_wrong_shape)),
    ("checkpoint-without-step", "'step'", _edited(_no_step)),
    ("checkpoint-nonfinite-parameter", "non-finite", _edited(_inf_param)),
    ("checkpoint-nan-config", "inner.lr", _edited(_nan_lr)),
    ("malicious-checkpoint", "refused", _evil_ckpt),
    ("eval-inner-lr-nan", "eval.inner_lr", lambda tmp, ctx: (["eval", str(ctx["sin_run"]), "--inner-lr", "nan"], {})),
    ("eval-out-under-a-file", "is a file", _out_under_file),
    ("wandb-online-without-key", "W&B", _wandb_no_key),
]


@pytest.mark.parametrize("name,match,setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, match, setup, tmp_path, request):
    ctx = {"home": tmp_path / "home"}
    if name in ("corrupt-deflate-member", "unreadable-png"):
        ctx["damaged"] = request.getfixturevalue("damaged")
    if name.startswith(("checkpoint-", "eval-")):
        ctx["sin_run"] = request.getfixturevalue("sin_run")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "home").mkdir()
    args, env = setup(work, ctx)
    before = snapshot(work)
    sin_before = snapshot(ctx["sin_run"]) if "sin_run" in ctx else None
    proc = run_cli(*args, env=env, cwd=work)
    if name in ("corrupt-deflate-member", "unreadable-png"):  # the first decode starts (its progress line), then fails
        first, _, rest = proc.stderr.partition("\n")
        assert first == "decoding omniglot (first use; cached afterwards) ...", proc.stderr
        proc.stderr = rest
    assert_one_line_error(proc, match)
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert snapshot(work) == before, "files were written"
    if sin_before is not None:
        assert snapshot(ctx["sin_run"]) == sin_before
    if name == "wandb-online-without-key":  # nothing left that blocks a re-run under the same name
        again = run_cli(*args, env=env, cwd=work)
        assert_one_line_error(again, match)
        assert "already holds a run" not in again.stderr


# --- non-finite values ----------------------------------------------------------------------------

def _float_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            yield from _float_keys(type(default), f"{prefix}{f.name}.")
        elif "float" in str(f.type):
            yield f"{prefix}{f.name}"


FLOAT_KEYS = list(_float_keys())


def test_every_float_setting_is_found():
    assert {"inner.lr", "outer.lr", "reptile.final_lr", "mamlpp.final_lr", "eval.inner_lr", "inner.lora_alpha",
            "transfer.pretrain.lr"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_nonfinite_float_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(MetalearnError, match=rf"^{key.replace('.', '[.]')} must be a finite number"):
        load_config(SINUSOID, [f"{key}={value}"])


def _sin_cfg(tmp_path, name, *extra):
    return load_config(SINUSOID, [*SIN, f"tracking.out_dir={tmp_path}", f"tracking.name={name}", *extra])


def test_nonfinite_parameters_after_an_update_stop_the_run_and_are_never_saved(tmp_path, monkeypatch):
    """An update that overflows a parameter at step 3: stop naming the step; the step-2 checkpoint stays."""
    build = train_module.build_algorithm

    def exploding(cfg, model):
        algorithm = build(cfg, model)
        outer_optimizer = algorithm.outer_optimizer

        def optimizer_that_overflows_at_step_3(params, lr):
            optimizer, calls = outer_optimizer(params, lr), []
            step = optimizer.step

            def overflowing_step(*a, **kw):
                step(*a, **kw)
                calls.append(1)
                if len(calls) == 3:
                    with torch.no_grad():
                        params[0].view(-1)[0] = float("inf")
            optimizer.step = overflowing_step
            return optimizer
        algorithm.outer_optimizer = optimizer_that_overflows_at_step_3
        return algorithm

    monkeypatch.setattr(train_module, "build_algorithm", exploding)
    cfg = _sin_cfg(tmp_path, "boom", "outer.iterations=4")
    with pytest.raises(MetalearnError, match=r"non-finite parameter .* after the outer update of step 3; .*"
                                             r"last good checkpoint \(step 2\) is kept"):
        train_module.train(cfg)
    ckpt = load_checkpoint(tmp_path / "boom")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(t).all() for st in ckpt["optimizer"]["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))
    assert not list((tmp_path / "boom").glob(".*.tmp"))


# --- paths a checkpoint names ---------------------------------------------------------------------

def test_eval_never_writes_or_deletes_where_a_crafted_checkpoint_points(omni_run, data_root, cache_dir, tmp_path):
    """data.cache_dir / data.root / tracking.out_dir of a checkpoint that passes weights_only point at a
    folder with an unrelated file, one even named like a cache: eval uses $METALEARN_DATA/$METALEARN_CACHE
    and changes nothing outside the run folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    (victim / "omniglot-28px-0123456789abcdef0123.pt").write_bytes(b"not a cache, not ours")
    ckpt = torch.load(omni_run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["data"]["cache_dir"] = str(victim)
    ckpt["config"]["data"]["root"] = str(victim / "omniglot")
    ckpt["config"]["tracking"]["out_dir"] = str(victim)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "checkpoint.pt")
    torch.load(run / "checkpoint.pt", weights_only=True)  # the crafted file passes the safety check
    outside = snapshot(tmp_path)
    proc = run_cli("eval", str(run / "checkpoint.pt"), "--no-progress", "--episodes", "2", cwd=tmp_path,
                   env={"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    after = snapshot(tmp_path)
    changed = {k for k in set(outside) | set(after) if outside.get(k) != after.get(k)}
    assert changed and all(k == "run" or k.startswith("run/") for k in changed), changed
    assert (victim / "notes.txt").read_text() == "precious"


def test_cache_cleanup_deletes_only_its_own_caches(tmp_path):
    from metalearn.data.base import write_cache

    names = ["a", "b"]
    images = torch.zeros(2, 1, 1, 4, 4, dtype=torch.uint8)
    stale = "toy-4px-*.pt"
    old = tmp_path / "toy-4px-aaaaaaaaaaaaaaaaaaaa.pt"
    write_cache(old, names, images, stale)
    lookalike = tmp_path / "toy-4px-bbbbbbbbbbbbbbbbbbbb.pt"
    lookalike.write_bytes(b"someone else's file")
    other = tmp_path / "toy-4px-mine.pt"
    torch.save({"class_names": names, "images": images}, other)  # not a fingerprint name
    write_cache(tmp_path / "toy-4px-cccccccccccccccccccc.pt", names, images, stale)
    assert not old.exists() and lookalike.exists() and other.exists()
    assert (tmp_path / "toy-4px-cccccccccccccccccccc.pt").exists()


# --- resume -------------------------------------------------------------------------------------

def test_resume_acts_on_the_copied_folder_and_cleans_stale_temp_files(tmp_path, monkeypatch):
    """A run stopped at step 2 of 4, copied: `train COPY --resume` continues the copy (its checkpoint,
    metrics and eval JSON), leaves the original untouched and removes the copy's stale temp files only."""
    from test_checkpoint import sigint_during_step

    build = train_module.build_algorithm
    monkeypatch.setattr(train_module, "build_algorithm", sigint_during_step(build, 2))
    part = train_module.train(_sin_cfg(tmp_path / "orig", "r", "outer.iterations=4"))
    assert part["interrupted"] == "SIGINT" and part["step"] == 2
    monkeypatch.setattr(train_module, "build_algorithm", build)
    orig = tmp_path / "orig" / "r"
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(orig, copy)
    stale = [copy / ".checkpoint.pt.ab12cd34.tmp", copy / ".metrics.jsonl.x_y9z8w7.tmp"]
    for f in stale:
        f.write_bytes(b"torn")
    (copy / "keep.tmp").write_text("not ours")
    before = snapshot(orig)
    proc = run_cli("train", str(copy), "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(orig) == before
    assert load_checkpoint(copy)["step"] == 4 and (copy / "eval-test.json").is_file()
    assert read_jsonl(copy / "metrics.jsonl")[-1]["step"] == 4
    assert not any(f.exists() for f in stale) and (copy / "keep.tmp").exists()
    assert f"run folder: {copy}" in proc.stdout


def test_resuming_a_finished_run_prints_its_result_and_changes_nothing(sin_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(sin_run, run)
    before = snapshot(run)
    for target in (run, run / "config.yaml"):
        proc = run_cli("train", str(target), "--resume", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "already finished" in proc.stderr and "test MSE:" in proc.stdout, proc.stdout + proc.stderr
        assert snapshot(run) == before
    rows = read_jsonl(run / "metrics.jsonl")
    assert sum("test/mse" in r for r in rows) == 1


def test_sigterm_during_the_final_evaluation_ends_with_a_message_and_143(tmp_path, monkeypatch, capsys):
    evaluate = train_module.run_evaluation

    def interrupted(cfg, algorithm, split, episodes, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(cfg, algorithm, split, episodes, **kw)

    monkeypatch.setattr(train_module, "run_evaluation", interrupted)
    code = cli.main(["train", str(SINUSOID), *SIN, f"tracking.out_dir={tmp_path}", "tracking.name=r"])
    err = capsys.readouterr().err
    assert code == 143 and "SIGTERM during the final evaluation" in err and "--resume" in err, err
    assert load_checkpoint(tmp_path / "r")["step"] == 2 and not (tmp_path / "r" / "eval-test.json").exists()
    monkeypatch.setattr(train_module, "run_evaluation", evaluate)
    assert cli.main(["train", str(tmp_path / "r"), "--resume"]) == 0  # --resume evaluates it
    assert (tmp_path / "r" / "eval-test.json").is_file()


def test_a_sigterm_stopped_wandb_segment_records_exit_code_143(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import wandb
    from test_tracking import flushed_wandb_records

    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wd", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, str(v))
    (tmp_path / "wd").mkdir()
    build = train_module.build_algorithm

    def sigterm_at_1(cfg, model):
        algorithm = build(cfg, model)
        meta_step = algorithm.meta_step

        def step(batch):
            os.kill(os.getpid(), signal.SIGTERM)
            return meta_step(batch)
        algorithm.meta_step = step
        return algorithm

    monkeypatch.setattr(train_module, "build_algorithm", sigterm_at_1)
    summary = train_module.train(_sin_cfg(tmp_path, "wb", "tracking.wandb.enabled=true", "outer.iterations=4"))
    assert summary["interrupted"] == "SIGTERM"
    wandb.teardown()  # wait for W&B's service process before looking for its files (flaky under load before)
    (log,) = (tmp_path / "wd" / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [r.exit.exit_code for r in flushed_wandb_records(log) if r.WhichOneof("record_type") == "exit"]
    assert exits == [143]


# --- writes ---------------------------------------------------------------------------------------

def test_atomic_files_get_the_umask_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_json({"a": 1}, tmp_path / "x.json")
    atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    for f in ("x.json", "x.pt"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o666 & ~umask


def test_a_full_disk_is_one_line_naming_the_path_and_keeps_the_old_file(sin_run, tmp_path, monkeypatch, capsys):
    """ENOSPC inside torch.save (chained in a RuntimeError) and at fsync: one line naming the path."""
    import metalearn._io as io

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old, complete")

    def full(obj, f):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e

    monkeypatch.setattr(io.torch, "save", full)
    with pytest.raises(MetalearnError, match=rf"cannot write {target}: No space left on device"):
        atomic_torch_save({"a": 1}, target)
    monkeypatch.undo()
    assert target.read_bytes() == b"old, complete" and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", no_space)
    out = tmp_path / "result.json"
    code = cli.main(["eval", str(sin_run), "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0] == f"metalearn: error: cannot write {out}: No space left on device"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_is_one_line_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = run_cli("train", str(SINUSOID), *SIN, f"tracking.out_dir={ro / 'runs'}")
        assert_one_line_error(proc, "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# --- supervised pre-training (metalearn/transfer/pretrain.py): the same guarantees as meta-training ----

PRETRAIN = QUICK.parent / "pretrain_omniglot.yaml"
PRE = ["transfer.pretrain.steps=3", "transfer.pretrain.batch_size=8", "model.hidden=8", "eval.val_every=0",
       "eval.episodes=2", "eval.query_shots=2", "eval.batch_size=2", "eval.inner_steps=1", "threads=1",
       "tracking.progress=false", "tracking.log_every=1", "checkpoint.every=1"]


def test_nonfinite_pretraining_parameters_stop_the_run_and_are_never_saved(tmp_path, data_root, cache_dir,
                                                                           monkeypatch):
    """An update that overflows a parameter at pre-training step 2: stop naming the step; the step-1
    checkpoint stays (finite parameters and optimiser state), no eval file."""
    from metalearn.transfer import pretrain

    step, calls = torch.optim.Adam.step, []

    def overflowing_step(self, *a, **kw):
        out = step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_step)
    cfg = load_config(PRETRAIN, [*PRE, f"data.root={data_root / 'omniglot'}", f"data.cache_dir={cache_dir}",
                                 f"tracking.out_dir={tmp_path}", "tracking.name=boom"])
    with pytest.raises(MetalearnError, match=r"non-finite parameter .* after the update of pre-training step 2; "
                                             r".*last good checkpoint \(step 1\) is kept"):
        pretrain(cfg)
    run = tmp_path / "boom"
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(t).all() for st in ckpt["optimizer"]["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))
    assert not (run / "eval-test.json").exists() and not list(run.glob(".*.tmp"))


def test_nonfinite_pretraining_optimiser_state_is_never_saved(tmp_path, data_root, cache_dir, monkeypatch):
    """Adam's second moment overflows at step 2 while the parameters are still finite: stop, keep step 1."""
    from metalearn.transfer import pretrain

    step, calls = torch.optim.Adam.step, []

    def overflowing_state(self, *a, **kw):
        out = step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            state = self.state[self.param_groups[0]["params"][-1]]
            state["exp_avg_sq"].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_state)
    cfg = load_config(PRETRAIN, [*PRE, f"data.root={data_root / 'omniglot'}", f"data.cache_dir={cache_dir}",
                                 f"tracking.out_dir={tmp_path}", "tracking.name=boom"])
    with pytest.raises(MetalearnError, match=r"non-finite optimiser state after the update of pre-training step 2"):
        pretrain(cfg)
    ckpt = load_checkpoint(tmp_path / "boom")
    assert ckpt["step"] == 1
    assert all(torch.isfinite(t).all() for st in ckpt["optimizer"]["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("optimizer, match, saved", [
    ("adam", "the update of pre-training step 1 overflows", None),  # was a torch traceback
    ("sgd", "non-finite pre-training loss at step 2; the last good checkpoint (step 1) is kept", 1),
])
def test_a_huge_pretraining_lr_is_one_line_and_saves_only_finite_checkpoints(tmp_path, data_root, cache_dir,
                                                                            optimizer, match, saved):
    proc = run_cli("pretrain", str(PRETRAIN), *PRE, "transfer.pretrain.lr=1e38",
                   f"transfer.pretrain.optimizer={optimizer}", f"tracking.out_dir={tmp_path}", "tracking.name=r",
                   env={"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)})
    assert_one_line_error(proc, match)
    run = tmp_path / "r"
    assert not (run / "eval-test.json").exists()
    if saved is None:
        assert not (run / "checkpoint.pt").exists()
        return
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == saved and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(t).all() for st in ckpt["optimizer"]["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))


def test_resuming_a_finished_pretraining_run_prints_its_result_and_changes_nothing(tmp_path, data_root, cache_dir):
    env = {"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)}
    proc = run_cli("pretrain", str(PRETRAIN), *PRE, f"tracking.out_dir={tmp_path}", "tracking.name=r", env=env)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "r"
    first = proc.stdout.strip().splitlines()[-1]
    assert first.startswith("test accuracy:"), proc.stdout
    before = snapshot(run)
    for target in (run, run / "config.yaml"):
        proc = run_cli("pretrain", str(target), "--resume", cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "already finished (3 steps)" in proc.stderr, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == first
        assert snapshot(run) == before
    rows = read_jsonl(run / "metrics.jsonl")
    assert sum("test/accuracy" in r for r in rows) == 1
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
