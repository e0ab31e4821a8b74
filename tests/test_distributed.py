"""torchrun data parallelism on CPU with gloo (metalearn/distributed.py).

2 processes reach the parameters of 1 process with the same global meta-batch (float64: equal to
1e-10 relative; only the order of the gradient sum differs), the same metrics and the same evaluation
numbers (bit for bit on the same checkpoint); only rank 0 writes; a run resumes with another number of
processes; what cannot be split (reptile) is refused on every rank without hanging.
"""
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn import distributed
from metalearn.checkpoint import load_checkpoint, save_checkpoint
from metalearn.config import load_config
from metalearn.data import EpisodeSampler, SinusoidSampler
from metalearn.errors import MetalearnError
from metalearn.tracking import read_jsonl
from metalearn.train import train

from conftest import decode_ids, id_images

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "experiments" / "configs" / "maml_sinusoid.yaml"
QUICK = REPO / "experiments" / "configs" / "omniglot_5w1s_quick.yaml"
RTOL = 1e-10  # float64, 10 outer steps: the gradient sum is reordered across processes, nothing else differs
# meta-batch 5 over 2 processes: an uneven split (3 + 2 tasks) weighted by task count
SINUSOID = ["dtype=float64", "outer.algorithm=metasgd", "outer.iterations=10", "outer.meta_batch_size=5",
            "model.hidden=16", "eval.episodes=130", "eval.batch_size=20", "tracking.log_every=1",
            "tracking.progress=false", "checkpoint.every=5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, cwd: Path, env=None, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "metalearn", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "METALEARN_DIST_TIMEOUT": "120", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_close_params(a: dict, b: dict, rtol: float = RTOL, noise_only=()) -> None:
    """Every tensor equal to rtol relative, except `noise_only`: parameters whose true gradient is 0
    (conv biases right before BatchNorm, which cancels them): their gradient is rounding noise, which
    Adam divides by its own size, so they drift by up to lr per step in an order-dependent way while
    having no effect on any output. For those only |difference| <= 1e-3 (outer.lr) * steps is checked."""
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        if name in noise_only:
            assert err <= 1e-3 * 4, name
            continue
        assert err <= rtol * max(a[name].abs().max().item(), 1e-30), (name, err)


# --- the pieces -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, world", [(32, 2), (5, 2), (7, 3), (4, 4), (600, 3)])
def test_shards_are_disjoint_contiguous_and_complete(n, world):
    parts = [distributed.shard(n, distributed.Context(rank=r, world_size=world)) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1
    for bs in (1, 7, 50):
        batches = [distributed.shard_batches(n, bs, distributed.Context(rank=r, world_size=world))
                   for r in range(world)]
        assert batches[0][0] == 0 and batches[-1][1] == n
        assert all(a[1] == b[0] and (b[0] % bs == 0 or b[0] == n) for a, b in zip(batches, batches[1:]))


def test_sampler_slice_is_the_slice_of_the_global_batch_and_advances_alike():
    images = id_images(20, 6)
    full = EpisodeSampler(images, 5, 1, 2, seed=3, rotate=False)
    part = EpisodeSampler(images, 5, 1, 2, seed=3, rotate=False)
    for _ in range(3):
        a, b = full.sample(7), part.sample(7, part=slice(4, 7))
        assert torch.equal(decode_ids(a.support.x[4:7])[0], decode_ids(b.support.x)[0])
        assert torch.equal(a.query.x[4:7], b.query.x) and torch.equal(a.query.y[4:7], b.query.y)
    assert torch.equal(full.generator.get_state(), part.generator.get_state())
    s_full, s_part = SinusoidSampler(5, 10, seed=1), SinusoidSampler(5, 10, seed=1)
    for _ in range(3):
        a, b = s_full.sample(9), s_part.sample(9, part=slice(0, 4))
        assert torch.equal(a.support.x[:4], b.support.x) and torch.equal(a.query.y[:4], b.query.y)
        assert torch.equal(s_full.last_phase[:4], s_part.last_phase)
    assert torch.equal(s_full.generator.get_state(), s_part.generator.get_state())


def test_single_process_context_is_a_no_op():
    ctx = distributed.context()
    assert not ctx.enabled and ctx.is_main and distributed.shard(5) == (0, 5)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.all_reduce_gradients([p], 0.5)
    assert torch.equal(p.grad, torch.full((3,), 2.0))  # one process: untouched (weight applies only when reducing)


# --- 2 processes against 1 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train(load_config(PRESET, [*SINUSOID, f"tracking.out_dir={out}", "tracking.name=run", "threads=1"]))
    return out / "run"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("two")
    proc = torchrun(2, "train", str(PRESET), *SINUSOID, "tracking.out_dir=runs", "tracking.name=run", cwd=cwd)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # A rare SIGABRT of rank 0 (seen once in the suite and twice in benchmarks/bench_distributed.py;
        # never reproduced on demand: 38 direct reruns, half of them two at a time, passed) gets one
        # fresh retry; any other failure, or a second abort, fails the test.
        print(f"two_processes: retrying after a gloo worker abort:\n{proc.stderr[-2000:]}", file=sys.stderr)
        shutil.rmtree(cwd / "runs", ignore_errors=True)
        proc = torchrun(2, "train", str(PRESET), *SINUSOID, "tracking.out_dir=runs", "tracking.name=run", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_two_processes_match_one_process(one_process, two_processes):
    cwd, proc = two_processes
    run = cwd / "runs" / "run"
    a, b = load_checkpoint(one_process), load_checkpoint(run)
    assert a["step"] == b["step"] == 10
    assert_close_params(a["model"], b["model"])
    assert_close_params(a["algorithm"]["alpha"], b["algorithm"]["alpha"])  # Meta-SGD's learned lrs: all-reduced too
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])  # the global sampler state
    rows = lambda p: [r for r in read_jsonl(p / "metrics.jsonl") if "train/loss" in r]  # noqa: E731
    ra, rb = rows(one_process), rows(run)
    assert [r["step"] for r in rb] == list(range(1, 11))  # logged once (rank 0 only), every step
    for x, y in zip(ra, rb):
        assert y["train/loss"] == pytest.approx(x["train/loss"], rel=1e-12)
        assert y["train/mse"] == pytest.approx(x["train/mse"], rel=1e-12)
    ea = json.loads((one_process / "eval-test.json").read_text())["eval"]
    eb = json.loads((run / "eval-test.json").read_text())["eval"]
    assert len(eb["accuracies"]) == 130  # 7 batches of 20 episodes split 4 + 3 across the processes
    assert eb["accuracies"] == pytest.approx(ea["accuracies"], rel=1e-9)
    assert eb["mean"] == pytest.approx(ea["mean"], rel=1e-9) and eb["ci95"] == pytest.approx(ea["ci95"], rel=1e-9)


def test_only_rank_zero_writes_and_prints(two_processes):
    cwd, proc = two_processes
    files = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file())
    assert files == [f"runs/run/{f}" for f in ["checkpoint.pt", "config.yaml", "eval-test.json", "learning_curve.png",
                                                "metrics.jsonl", "run.json"]]
    assert json.loads((cwd / "runs" / "run" / "run.json").read_text())["world_size"] == 2
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("test MSE:") == 1
    assert proc.stderr.count("execution:") == 1


def test_eval_of_one_checkpoint_is_identical_with_two_processes(one_process, tmp_path):
    ckpt = str(one_process / "checkpoint.pt")
    one = subprocess.run([sys.executable, "-m", "metalearn", "eval", ckpt, "--shots", "5", "--episodes", "75",
                          "--batch-size", "10", "--no-progress", "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "eval", ckpt, "--shots", "5", "--episodes", "75", "--batch-size", "10", "--no-progress",
                   "--out", str(tmp_path / "two.json"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one.json").read_text())["eval"]
    b = json.loads((tmp_path / "two.json").read_text())["eval"]
    assert a == b  # every episode's MSE, mean and CI, bit for bit
    assert two.stdout.count("saved") == 1


def test_resume_with_a_different_number_of_processes(one_process, tmp_path):
    """A checkpoint at step 5 of a 1-process run, resumed by 2 processes, ends where 1 process ends."""
    first = tmp_path / "runs" / "half"
    train(load_config(PRESET, [*SINUSOID, "outer.iterations=5", f"tracking.out_dir={tmp_path / 'runs'}",
                               "tracking.name=half", "threads=1"]))
    # make the 5-step run a 10-step run interrupted after step 5 (iterations is fixed for a run: edit the config)
    ckpt = load_checkpoint(first)
    ckpt["config"]["outer"]["iterations"] = 10
    save_checkpoint(first / "checkpoint.pt", **{k: v for k, v in ckpt.items() if k != "format"})
    (first / "config.yaml").write_text((first / "config.yaml").read_text().replace("iterations: 5", "iterations: 10"))
    (first / "eval-test.json").unlink()
    proc = torchrun(2, "train", str(first / "config.yaml"), "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("from step 5 of 10") == 1
    resumed, reference = load_checkpoint(first), load_checkpoint(one_process)
    assert resumed["step"] == 10
    assert_close_params(resumed["model"], reference["model"])
    assert torch.equal(resumed["sampler"]["generator"], reference["sampler"]["generator"])
    assert [r["step"] for r in read_jsonl(first / "metrics.jsonl") if "train/loss" in r] == list(range(1, 11))


def test_reptile_and_a_too_small_meta_batch_are_refused(tmp_path):
    proc = torchrun(2, "train", str(PRESET), "outer.algorithm=reptile", "tracking.out_dir=runs", cwd=tmp_path,
                    timeout=120)
    assert proc.returncode != 0
    # Every rank refuses on its own, but torchrun stops the other ranks as soon as the first one exits, so on
    # a busy machine the second rank may be stopped before it prints: at least one line.
    assert 1 <= proc.stderr.count("metalearn: error: outer.algorithm=reptile cannot be split across processes") <= 2
    assert not (tmp_path / "runs").exists()
    with pytest.raises(MetalearnError, match="outer.meta_batch_size=1 is smaller than the 2 processes"):
        distributed.check_meta_batch(1, distributed.Context(rank=1, world_size=2))


def test_existing_run_folder_is_an_error_on_every_rank(one_process, tmp_path):
    """Rank 0 alone looks at the run folder; its verdict reaches the other process (no hang)."""
    proc = torchrun(2, "train", str(PRESET), *SINUSOID, f"tracking.out_dir={one_process.parent}", "tracking.name=run",
                    cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert 1 <= proc.stderr.count("already holds a run") <= 2  # torchrun may stop one rank before it prints


@pytest.mark.slow
def test_omniglot_conv4_two_processes_match_one(data_root, cache_dir, tmp_path):
    """conv4 with BatchNorm on real Omniglot, second-order MAML, float64: 2 processes = 1 process."""
    args = [str(QUICK), "dtype=float64", "model.hidden=8", "outer.iterations=4", "outer.meta_batch_size=4",
            "data.query_shots=2", "eval.episodes=10", "eval.query_shots=2", "eval.batch_size=4",
            "tracking.progress=false", "tracking.log_every=1"]
    env = {"METALEARN_DATA": str(data_root), "METALEARN_CACHE": str(cache_dir)}
    os.environ.update(env)
    train(load_config(args[0], [*args[1:], f"tracking.out_dir={tmp_path / 'one'}", "tracking.name=run", "threads=1"]))
    proc = torchrun(2, "train", *args, "tracking.out_dir=two", "tracking.name=run", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "one" / "run"), load_checkpoint(tmp_path / "two" / "run")
    assert_close_params(a["model"], b["model"], noise_only=[f"features.{i}.conv.bias" for i in range(4)])
    ea = json.loads((tmp_path / "one" / "run" / "eval-test.json").read_text())["eval"]
    eb = json.loads((tmp_path / "two" / "run" / "eval-test.json").read_text())["eval"]
    assert eb["accuracies"] == ea["accuracies"]  # accuracies are k/10 fractions: parameters 1e-16 apart agree


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_then_resume_with_one_process(tmp_path):
    """torchrun forwards SIGTERM to both workers; the signal flag is all-reduced with the metrics, so
    both finish the same step, rank 0 saves it, and a 1-process --resume ends where 1 process ends."""
    from test_checkpoint_resume import _wait_for_step

    steps = 1500
    args = [str(PRESET), "dtype=float64", f"outer.iterations={steps}", "model.hidden=16", "tracking.log_every=1",
            "eval.episodes=20", "tracking.progress=false", "checkpoint.every=0"]
    train(load_config(args[0], [*args[1:], f"tracking.out_dir={tmp_path / 'ref'}", "tracking.name=run", "threads=1"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "metalearn", "train", *args, "tracking.out_dir=two",
           "tracking.name=run"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, tmp_path / "two" / "run" / "metrics.jsonl", 60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    run = tmp_path / "two" / "run"
    saved = load_checkpoint(run)["step"]
    assert err.count("metalearn: SIGTERM at step") == 1 and f"SIGTERM at step {saved}:" in err
    assert 60 <= saved < steps and saved == read_jsonl(run / "metrics.jsonl")[-1]["step"]
    assert not (run / "eval-test.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "metalearn", "train", str(run / "config.yaml"), "--resume"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)  # out_dir is relative
    assert resumed.returncode == 0, resumed.stderr
    # float64 over 1500 Adam steps, a stretch of them with 2 processes: agreement to 1e-9 relative
    assert_close_params(load_checkpoint(run)["model"], load_checkpoint(tmp_path / "ref" / "run")["model"], rtol=1e-9)


# --- python -m metalearn.launch: torchrun with metalearn's exit codes -------------------------------

def _failed(*codes: int):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {r: ProcessFailure(local_rank=r, pid=1000 + r, exitcode=c, error_file="<N/A>")
                for r, c in enumerate(codes)}
    for r, f in failures.items():
        f.timestamp = r  # rank 0 failed first
    return ChildFailedError(name="metalearn", failures=failures)


def _signal(sig):
    from torch.distributed.elastic.multiprocessing.api import SignalException

    return SignalException("got signal", sigval=sig)


@pytest.fixture
def launch_main(monkeypatch):
    """metalearn.launch.main with torchrun's `run` replaced by `fake`; SIGTERM's handler restored after."""
    from torch.distributed import run as torchrun
    from metalearn import launch

    before = signal.getsignal(signal.SIGTERM)

    def call(fake, argv):
        monkeypatch.setattr(torchrun, "run", fake)
        return launch.main(argv)
    yield call
    signal.signal(signal.SIGTERM, before)


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torchrun's @record under capsys
@pytest.mark.parametrize("raised, code, line", [
    (lambda: _signal(signal.SIGTERM), 143, "metalearn.launch: SIGTERM: the launcher stopped its processes (exit 143)"),
    (lambda: _signal(signal.SIGINT), 130, "metalearn.launch: SIGINT: the launcher stopped its processes (exit 130)"),
    (lambda: KeyboardInterrupt(), 130, "metalearn.launch: SIGINT: the launcher stopped (exit 130)"),
    (lambda: _failed(143, 143), 143, "metalearn.launch: SIGTERM: rank 0 stopped (exit 143)"),
    (lambda: _failed(-15, 1), 143, "metalearn.launch: SIGTERM: rank 0 stopped (exit 143)"),
    (lambda: _failed(130), 130, "metalearn.launch: SIGINT: rank 0 stopped (exit 130)"),
    (lambda: _failed(2, 2), 2, "metalearn.launch: error: rank 0 exited with 2 (2 of the processes failed; their "
                               "messages are above)"),
    (lambda: _failed(-9), 137, "metalearn.launch: SIGKILL: rank 0 stopped (exit 137)"),
    (lambda: RuntimeError("The server socket has failed to listen on any local network address.\n port: 1"), 1,
     "metalearn.launch: error: The server socket has failed to listen on any local network address. port: 1"),
], ids=["sigterm", "sigint", "keyboard-interrupt", "ranks-exit-143", "rank-killed-by-sigterm", "rank-exit-130",
        "ranks-exit-2", "rank-sigkill", "rendezvous-error"])
def test_launch_turns_the_launchers_end_into_one_line_and_an_exit_code(launch_main, capsys, raised, code, line):
    def fail(args):
        raise raised()

    assert launch_main(fail, ["--nproc_per_node", "2", "train", "x.yaml"]) == code
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_launch_takes_torchruns_arguments_and_a_bare_command(launch_main, monkeypatch, tmp_path):
    seen = []
    monkeypatch.chdir(tmp_path)
    assert launch_main(seen.append, ["--nproc_per_node", "2", "train", "c.yaml", "outer.lr=0.1"]) == 0
    assert launch_main(seen.append, ["--nproc_per_node", "2", "-m", "metalearn", "eval", "ckpt.pt"]) == 0
    (tmp_path / "train").write_text("")  # a script named like a command is run as a script
    assert launch_main(seen.append, ["train", "a"]) == 0
    assert [(a.module, a.training_script, a.training_script_args) for a in seen] == [
        (True, "metalearn", ["train", "c.yaml", "outer.lr=0.1"]), (True, "metalearn", ["eval", "ckpt.pt"]),
        (False, "train", ["a"])]
    assert seen[0].nproc_per_node == "2"


def test_sigterm_to_the_launch_wrapper_exits_143_without_a_traceback_and_the_checkpoint_resumes(tmp_path):
    """The launcher (python -m metalearn.launch) gets SIGTERM once the run has logged a step: torchrun
    forwards it, the workers save the step they finish, and the launcher ends with one line and 143
    (plain torchrun: its traceback and exit 1). The checkpoint then resumes to the end in one process."""
    from test_checkpoint_resume import _wait_for_step

    steps = 600  # far more than the 2-process run reaches before the signal lands
    args = [str(PRESET), f"outer.iterations={steps}", "model.hidden=8", "outer.meta_batch_size=4",
            "tracking.log_every=1", "eval.episodes=10", "tracking.progress=false", "checkpoint.every=0",
            "tracking.out_dir=runs", "tracking.name=run"]
    cmd = [sys.executable, "-m", "metalearn.launch", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METALEARN_DIST_TIMEOUT": "120"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "run"
    try:
        _wait_for_step(proc, run / "metrics.jsonl", 2, timeout=120)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    assert err.splitlines()[-1] == "metalearn.launch: SIGTERM: the launcher stopped its processes (exit 143)"
    saved = load_checkpoint(run)["step"]
    assert err.count(f"metalearn: SIGTERM at step {saved}:") == 1
    assert 2 <= saved < steps and saved == read_jsonl(run / "metrics.jsonl")[-1]["step"]
    assert not (run / "eval-test.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "metalearn", "train", str(run), "--resume", "threads=1"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {saved} of {steps}" in resumed.stderr
    assert load_checkpoint(run)["step"] == steps and (run / "eval-test.json").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r] == list(range(1, steps + 1))
