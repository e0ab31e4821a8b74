"""Bookkeeping a researcher publishes from (issue #16): evaluation files never overwritten, learning curves
titled with the run and its result, TensorBoard beside W&B, --version, eval overrides, the decode progress
line, the per-episode evaluation bar, one result-line format, and run.json provenance."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import metalearn.checkpoint as checkpoint_module
import metalearn.train as train_module
from metalearn.checkpoint import git_info, metalearn_info
from metalearn.cli import main
from metalearn.config import load_config
from metalearn.evaluation import EvalResult, evaluate
from metalearn.train import train

from test_cli import QUICK, REPO, assert_one_line_error, run_cli

SINUSOID = REPO / "experiments" / "configs" / "maml_sinusoid.yaml"
SIN_TINY = ["outer.iterations=3", "eval.episodes=4", "model.hidden=8", "threads=1", "tracking.progress=false",
            "tracking.log_every=1"]
OMNI_TINY = ["outer.iterations=2", "eval.episodes=2", "model.hidden=8", "threads=1", "tracking.progress=false",
             "tracking.log_every=1", "data.query_shots=2"]


@pytest.fixture
def data_env(data_root, cache_dir, monkeypatch):
    monkeypatch.setenv("METALEARN_DATA", str(data_root))
    monkeypatch.setenv("METALEARN_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def sin_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    summary = train(load_config(SINUSOID, [*SIN_TINY, f"tracking.out_dir={out}", "tracking.name=s"]))
    return Path(summary["run_dir"])


# --- 1. evaluation files ---------------------------------------------------------------------------------

def test_eval_with_different_inner_steps_writes_two_files(data_env, tmp_path, capsys):
    """The issue's command: `metalearn eval runs/X --episodes 20 --inner-steps 1`, then `--inner-steps 5`."""
    assert main(["train", str(QUICK), *OMNI_TINY, f"tracking.out_dir={tmp_path}", "tracking.name=x"]) == 0
    run = tmp_path / "x"
    own = (run / "eval-test.json").read_bytes()
    for steps in (1, 5):
        assert main(["eval", str(run), "--episodes", "20", "--inner-steps", str(steps), "--no-progress"]) == 0
    files = sorted(p.name for p in run.glob("eval-test-*.json"))
    assert len(files) == 2, files
    saved = {json.loads((run / f).read_text())["eval"]["inner_steps"]: f for f in files}
    assert set(saved) == {1, 5} and "-1step-" in saved[1] and "-5steps-" in saved[5]
    assert (run / "eval-test.json").read_bytes() == own  # the training run's own result is never touched
    out = capsys.readouterr().out
    assert out.count("saved ") == 2 and "over 20 5-way 1-shot episodes, 1 inner step\n" in out


@pytest.mark.parametrize("change", [dict(split="val"), dict(ways=20), dict(shots=5), dict(query_shots=5),
                                    dict(inner_steps=5), dict(inner_lr=0.1), dict(inner_lr=None),
                                    dict(transductive=False), dict(episodes=600), dict(seed=1)])
def test_every_setting_that_changes_the_numbers_changes_the_file_name(change):
    base = EvalResult("test", 20, 5, 1, 15, 1, 0.4, 0, "transductive", 0.9, 0.01, [0.9] * 20)
    other = EvalResult(**{**base.__dict__, **change})
    assert base.file_name() == "eval-test-5w1s15q-1step-lr0.4-transductive-seed0-20ep.json"
    assert other.file_name() != base.file_name() and other.file_name() != "eval-test.json"
    sinusoid = EvalResult(**{**base.__dict__, "metric": "mse", "ways": 1, "shots": 10, "query_shots": 10})
    assert sinusoid.file_name() == "eval-test-10s10q-1step-lr0.4-seed0-20ep.json"
    protonet = EvalResult(**{**base.__dict__, "inner_loop": False})
    assert protonet.file_name() == "eval-test-5w1s15q-transductive-seed0-20ep.json"


# --- 4. result lines: one format, "1 inner step", no steps for ProtoNet ----------------------------------------

def test_result_lines_singular_step_and_protonet():
    r = EvalResult("test", 600, 5, 1, 15, 1, 0.4, 0, "transductive", 0.9316, 0.0052, [0.9] * 2)
    assert r.summary() == "test accuracy: 93.16 ± 0.52% (95% CI) over 600 5-way 1-shot episodes, 1 inner step"
    assert EvalResult(**{**r.__dict__, "inner_steps": 5}).summary().endswith(", 5 inner steps")
    assert EvalResult(**{**r.__dict__, "inner_loop": False}).summary().endswith("over 600 5-way 1-shot episodes")


def test_train_and_eval_print_the_same_result_line(sin_run, capsys):
    capsys.readouterr()
    trained = json.loads((sin_run / "eval-test.json").read_text())["eval"]
    from metalearn.cli import final_line

    assert main(["eval", str(sin_run), "--no-progress", "--out", str(sin_run.parent / "same.json")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line == final_line(trained) and line.startswith("test MSE: ")
    assert "10-shot sinusoid episodes, 10 inner steps" in line


def test_protonet_lines_have_no_inner_steps(data_env, tmp_path, capsys):
    assert main(["train", str(QUICK), *OMNI_TINY, "outer.algorithm=protonet", f"tracking.out_dir={tmp_path}",
                 "tracking.name=p"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("test accuracy:") and line.endswith("over 2 5-way 1-shot episodes"), line


# --- 4. eval overrides and --threads, --version -------------------------------------------------------------

def test_eval_takes_key_value_overrides_and_threads(sin_run, capsys):
    assert main(["eval", str(sin_run), "eval.episodes=3", "eval.seed=7", "--threads", "2", "--no-progress"]) == 0
    saved = json.loads((sin_run / "eval-test-10s10q-10steps-lr0.01-seed7-3ep.json").read_text())["eval"]
    assert saved["episodes"] == 3 and saved["seed"] == 7 and saved["threads"] == 2
    # options win over key=value overrides; overrides may also follow the options
    assert main(["eval", str(sin_run), "--episodes", "2", "--no-progress", "eval.episodes=3", "threads=1"]) == 0
    assert json.loads((sin_run / "eval-test-10s10q-10steps-lr0.01-seed0-2ep.json").read_text())["eval"]["threads"] == 1
    # the execution path is a runtime choice too (the sinusoid MLP runs batched by default), recorded in the result
    out = sin_run / "loop.json"
    assert main(["eval", str(sin_run), "--episodes", "2", "--no-progress", "outer.execution=loop",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["eval"]["execution"] == "loop"
    # so is outer.compile (a checkpoint trained compiled can be evaluated eagerly, and the reverse key is accepted)
    assert main(["eval", str(sin_run), "--episodes", "2", "--no-progress", "outer.compile=false",
                 "--out", str(sin_run / "eager.json")]) == 0


@pytest.mark.parametrize("override, match", [("model.hidden=4", "model.hidden cannot be changed"),
                                             ("inner.lr=0.1", "inner.lr cannot be changed"),
                                             ("eval.nope=1", "eval.nope"), ("eval.episodes=many", "eval.episodes"),
                                             ("eval.episodes=0", "eval.episodes")])
def test_eval_refuses_other_keys_with_one_line(sin_run, override, match):
    assert_one_line_error(run_cli("eval", str(sin_run), override, "--no-progress"), match)


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"metalearn {metalearn_info()['version']}") and f"torch {torch.__version__}" in line
    assert len(proc.stdout.strip().splitlines()) == 1


# --- 4. progress: first decode, evaluation bar per episode ----------------------------------------------------

def test_first_decode_prints_a_progress_line_and_the_time(tmp_path, capsys):
    import numpy as np

    from metalearn.data.base import ImageDataset

    class Tiny(ImageDataset):
        name, channels = "tiny", 1

        def _index(self):
            return ["a", "b"], [3, 3]

        def _sources(self):
            return [self.root / "src"]

        def _decode(self):
            return [np.zeros((3, 4, 4), np.uint8), np.full((3, 4, 4), 255, np.uint8)]

    (tmp_path / "src").write_text("x")
    ds = Tiny(tmp_path, image_size=4, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (2, 3, 1, 4, 4)
    err = capsys.readouterr().err
    assert "decoding tiny (first use; cached afterwards) ..." in err and "decoded tiny in " in err and " s;" in err
    again = Tiny(tmp_path, image_size=4, cache_dir=tmp_path / "cache")
    assert again.images.shape == (2, 3, 1, 4, 4) and "decoding" not in capsys.readouterr().err  # from the cache


def test_evaluation_bar_moves_per_episode(monkeypatch):
    """A per-task evaluation loop reports each episode: the bar counts 1, 2, 3, ... within one batch."""
    import metalearn.evaluation as evaluation

    seen = []

    class Loop:
        metric_name = "mse"
        on_episode = None

        def evaluate_batch(self, batch, *, steps, lr, transductive):
            for _ in range(batch.num_tasks):
                self.on_episode()
                seen.append(bar_ref[0].n)
            return torch.zeros(batch.num_tasks, dtype=torch.float64)

    bar_ref = []
    real_tqdm = evaluation.tqdm

    def tqdm(*a, **k):
        bar_ref.append(real_tqdm(*a, **k))
        return bar_ref[0]

    monkeypatch.setattr(evaluation, "tqdm", tqdm)
    algo = Loop()
    from metalearn.data.benchmark import open_benchmark

    evaluate(algo, None, ways=1, shots=5, query_shots=5, episodes=6, seed=0, inner_steps=1, inner_lr=0.01,
             batch_size=6, benchmark=open_benchmark(load_config(SINUSOID, [])), progress=True)
    assert seen == [1, 2, 3, 4, 5, 6] and algo.on_episode is None and bar_ref[0].n == 6


def test_real_algorithm_loops_report_each_episode(sin_run):
    """MAML's per-task evaluation loop (sinusoid: no batched path for an MLP with execution loop) calls episode_done."""
    from metalearn.config import from_dict
    from metalearn.models import build_model

    cfg = from_dict(torch.load(sin_run / "checkpoint.pt", weights_only=True)["config"])
    cfg.outer.execution = "loop"
    algo = train_module.build_algorithm(cfg, build_model(cfg.model, 1, 1, cfg.data.image_size))
    calls = []
    algo.on_episode = lambda: calls.append(1)
    from metalearn.data import fixed_sinusoid_episodes

    batch = next(iter(fixed_sinusoid_episodes(5, 5, count=3, seed=0, batch_size=3, protocol="maml")))
    algo.evaluate_batch(batch, steps=1, lr=0.01)
    assert len(calls) == 3


# --- 2. learning curve after the final evaluation, titled ------------------------------------------------------

def test_learning_curve_is_drawn_after_the_evaluation_with_a_title(tmp_path, monkeypatch):
    titles = []
    real = train_module.plot_learning_curve

    def plot(rows, path, title=""):
        titles.append(title)
        return real(rows, path, title=title)

    monkeypatch.setattr(train_module, "plot_learning_curve", plot)
    summary = train(load_config(SINUSOID, [*SIN_TINY, f"tracking.out_dir={tmp_path}", "tracking.name=curve"]))
    result = EvalResult.from_dict(summary["eval"])
    assert titles == [f"curve: maml, sinusoid 10-shot, 1 inner step (lr 0.01), meta-batch 25, 3 outer steps, seed 0\n"
                      f"{result.summary()}"]
    assert (tmp_path / "curve" / "learning_curve.png").stat().st_size > 0


def test_pretraining_curve_title_carries_the_result(data_env, tmp_path, monkeypatch):
    from metalearn.transfer import pretrain, summary_line

    titles = []
    real = train_module.plot_learning_curve  # pre-training runs through train.py's loop
    monkeypatch.setattr(train_module, "plot_learning_curve",
                        lambda rows, path, title="": titles.append(title) or real(rows, path, title=title))
    cfg = load_config(QUICK, [*OMNI_TINY, "outer.algorithm=finetune", "transfer.pretrain.steps=2",
                              "transfer.pretrain.batch_size=8", f"tracking.out_dir={tmp_path}", "tracking.name=pt"])
    summary = pretrain(cfg)
    assert len(titles) == 1 and titles[0].startswith("pt: pre-training 2 steps, batch 8")
    assert titles[0].endswith(summary_line(summary["eval"]))


# --- 3. TensorBoard, W&B offline ---------------------------------------------------------------------------

class _FakeWriter:
    """Records what a SummaryWriter is given (torch.utils.tensorboard needs the tensorboard package)."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars, self.images, self.texts, self.closed = [], [], [], False
        _FakeWriter.made.append(self)

    def add_scalar(self, k, v, step):
        self.scalars.append((k, v, step))

    def add_image(self, k, img, step, dataformats="CHW"):
        self.images.append((k, img.shape, step, dataformats))

    def add_text(self, k, text, step):
        self.texts.append((k, text, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_tracker_gets_scalars_figure_and_result(tmp_path, monkeypatch):
    """Wiring, with a stand-in writer: runs without the tensorboard package."""
    _FakeWriter.made.clear()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeWriter))
    summary = train(load_config(SINUSOID, [*SIN_TINY, f"tracking.out_dir={tmp_path}", "tracking.name=tb",
                                           "tracking.tensorboard=true"]))
    (w,) = _FakeWriter.made
    assert Path(w.log_dir) == tmp_path / "tb" / "tensorboard" and w.purge_step is None and w.closed
    assert [s for k, v, s in w.scalars if k == "train/loss"] == [1, 2, 3]
    assert ("test/mse", summary["eval"]["mean"], 3) in w.scalars
    assert w.images and w.images[0][0] == "learning_curve" and w.images[0][2] == 3 and w.images[0][3] == "HWC"
    texts = {k: t for k, t, _ in w.texts}
    assert texts["eval/test"] == EvalResult.from_dict(summary["eval"]).summary()
    assert '"iterations": 3' in texts["config"]


def test_tensorboard_missing_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    assert main(["train", str(SINUSOID), *SIN_TINY, f"tracking.out_dir={tmp_path / 'runs'}", "tracking.name=x",
                 "tracking.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("metalearn: error:") and "pip install tensorboard" in err[-1]
    assert not (tmp_path / "runs").exists()


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train(load_config(SINUSOID, [*SIN_TINY, f"tracking.out_dir={tmp_path}", "tracking.name=tb",
                                           "tracking.tensorboard=true"]))
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"),
                           size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    jsonl = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert loss == [(r["step"], pytest.approx(r["train/loss"], rel=1e-6)) for r in jsonl if "train/loss" in r]
    assert acc.Scalars("test/mse")[0].value == pytest.approx(summary["eval"]["mean"], rel=1e-6)
    assert acc.Images("learning_curve")[0].step == 3 and acc.Images("learning_curve")[0].width > 0
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    shown = EvalResult.from_dict(summary["eval"]).summary()
    assert any(shown in v for k, v in texts.items() if k.startswith("eval/test"))


def test_wandb_offline_run_prints_where_and_the_sync_command(tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wd")}
    (tmp_path / "wd").mkdir()
    proc = run_cli("train", str(SINUSOID), *SIN_TINY, f"tracking.out_dir={tmp_path}", "tracking.name=w",
                   "tracking.wandb.enabled=true", "tracking.wandb.log_checkpoint=false", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("W&B offline run written to "))
    folder = Path(lines[i].split("written to ", 1)[1].split(";")[0])
    assert folder.is_dir() and folder.name.startswith("offline-run-") and folder.parent.parent == tmp_path / "wd"
    assert lines[i + 1].strip() == f"wandb sync {folder}"


# --- 5. provenance ----------------------------------------------------------------------------------------

def test_run_json_records_versions_and_the_working_folders_commit(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=work, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (work / "notes.txt").write_text("x")
    git("add", "notes.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    proc = run_cli("train", str(SINUSOID), *SIN_TINY, "tracking.out_dir=runs", "tracking.name=r", cwd=work)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((work / "runs" / "r" / "run.json").read_text())
    assert run["metalearn"]["version"] == metalearn_info()["version"]
    assert run["metalearn"]["commit"] == git_info(REPO)["commit"]  # the tests run from a metalearn checkout
    assert run["workdir"] == {"path": str(work.resolve()), "commit": head, "dirty": False}
    (work / "notes.txt").write_text("changed")
    proc = run_cli("train", str(SINUSOID), *SIN_TINY, "tracking.out_dir=runs", "tracking.name=r2", cwd=work)
    assert json.loads((work / "runs" / "r2" / "run.json").read_text())["workdir"]["dirty"] is True

    plain = tmp_path / "plain"  # not a repository: the folder only
    plain.mkdir()
    proc = run_cli("train", str(SINUSOID), *SIN_TINY, "tracking.out_dir=runs", "tracking.name=r", cwd=plain)
    assert proc.returncode == 0
    run = json.loads((plain / "runs" / "r" / "run.json").read_text())
    assert run["workdir"] == {"path": str(plain.resolve())} and run["metalearn"]["version"]


def test_an_installed_wheel_records_the_version_without_a_commit(monkeypatch):
    """Installed into site-packages (inside whatever repository the virtual environment lies in): no commit
    of that repository is taken for metalearn's; without git at all the version is still there."""
    real = checkpoint_module._git

    def elsewhere(where, *args):
        if args == ("rev-parse", "--show-toplevel"):
            return "/some/other/repository"
        return real(where, *args)

    monkeypatch.setattr(checkpoint_module, "_git", elsewhere)
    info = metalearn_info()
    assert info == {"version": info["version"]} and info["version"]
    monkeypatch.setattr(checkpoint_module, "_git", lambda *a: (_ for _ in ()).throw(FileNotFoundError("git")))
    assert metalearn_info() == {"version": info["version"]}
