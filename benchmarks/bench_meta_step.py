"""Milliseconds per meta-iteration: metalearn's execution paths against learn2learn and higher,
in one process tree, on the same data and the same initial weights, after checking that they agree.

    .venv/bin/python benchmarks/bench_meta_step.py --device cpu --threads 2 --rows omniglot-5w1s-1step,sinusoid \\
        --out benchmarks/results/meta_step_cpu.json
    python benchmarks/bench_meta_step.py --device cuda --out benchmarks/results/meta_step_h100.json   # all rows

A meta-iteration = zero_grad + meta_step on a fresh meta-batch (inner loop on every task's support
set, query loss, outer backward) + Adam step; the timed region ends with a device synchronise.
Each (row, path) is timed in a fresh subprocess, so its peak memory is its own: CUDA's
max_memory_allocated on GPU; on CPU, how much the process's peak resident set size (the kernel's
VmHWM, reset when timing starts) grew during the timed iterations (the interpreter, torch, the model
and the batches excluded). On CUDA, --in-process times the paths one after another in this process
instead (max_memory_allocated reset per path, the caching allocator emptied between them): a fresh
process costs ~15 s on a lent GPU machine.

Rows (the issue's table; images are uniform noise of the right shape, which does not change the
work done; conv4 with BatchNorm, 15 query examples per class, second order unless stated):
    omniglot-5w1s-1step     5-way 1-shot, 32 tasks, 1 inner step, 64 filters, 28x28x1
    omniglot-5w1s-5step     as above, 5 inner steps
    omniglot-20w1s-5step    20-way 1-shot, 16 tasks, 5 inner steps
    miniimagenet-5w5s-5step 5-way 5-shot, 4 tasks, 5 inner steps, 32 filters, 84x84x3
    omniglot-5w1s-fo        first-order, 5-way 1-shot, 32 tasks, 1 inner step
    sinusoid                MLP 1-40-40-1, 25 tasks, K = 10 support and 10 query points, 5 inner steps, MSE
    resnet12-5w1s-1step     ResNet-12 (64-160-320-640, metalearn/models/resnet12.py), 84x84x3, 5-way 1-shot,
                            4 tasks, 1 inner step of 0.01, 5 query examples per class (15 make one CPU
                            meta-step of the loop about a minute)
    resnet12-5w1s-5step     as above, 5 inner steps
    user-5w1s-1step         a user-defined model (UserNet below: conv blocks with nn.BatchNorm2d tracking
                            running statistics, a GroupNorm residual block, global pooling), 28x28x1,
                            5-way 1-shot, 16 tasks, 1 inner step
    omniglot-quick          the quick preset's meta-batch (experiments/configs/omniglot_5w1s_quick.yaml):
                            5-way 1-shot, 8 tasks, 5 query examples per class, 32 filters, 1 inner step
                            (not in the default --rows)
Paths: loop (metalearn's per-task reference), batched (tasks as a batch dimension), hybrid
(batched support sets, per-task query sets on channels-last images), batched-vmap and hybrid-vmap
(the same through torch.func.vmap for conv4 and the MLP too, their hand-written twins off; for any
other model batched and hybrid are vmap already), learn2learn
(l2l.algorithms.MAML, clone/adapt per task), higher (innerloop_ctx per task), and
learn2learn-cl: learn2learn fed the same channels-last images that hybrid uses (what a
learn2learn user could do by hand; it shows how much of a CPU speed-up is memory layout alone;
image rows only). Not run by default: loop+ckpt, batched+ckpt, hybrid+ckpt, the same paths with
inner-loop activation checkpointing (algorithm.set_checkpoint(True)), to measure the memory it
saves; compiled and compiled-batched, the meta-step through torch.compile (outer.compile,
metalearn/compiled.py) one task at a time or vmapped over tasks, whose first step (first_step_s)
includes minutes of compilation (inductor caches it on disk, so the timed worker mostly reuses the
agreement check's). learn2learn and higher are imported here only; a path whose package is missing
is reported as skipped.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from metalearn._io import atomic_json
from metalearn.algorithms import MAML
from metalearn.engine import Engine
from metalearn.inner.layout import channels_last
from metalearn.models import MLP, Conv4, ResNet12
from metalearn.types import Examples, TaskBatch


@dataclass(frozen=True)
class Row:
    name: str
    ways: int
    shots: int
    tasks: int
    steps: int
    lr: float
    first_order: bool = False
    hidden: int = 64
    size: int = 28
    channels: int = 1
    query: int = 15
    sinusoid: bool = False
    model: str = "conv4"  # conv4 | mlp | resnet12 | user


ROWS = {r.name: r for r in [
    Row("omniglot-5w1s-1step", 5, 1, 32, 1, 0.4),
    Row("omniglot-5w1s-5step", 5, 1, 32, 5, 0.4),
    Row("omniglot-20w1s-5step", 20, 1, 16, 5, 0.1),
    Row("miniimagenet-5w5s-5step", 5, 5, 4, 5, 0.01, hidden=32, size=84, channels=3),
    Row("omniglot-5w1s-fo", 5, 1, 32, 1, 0.4, first_order=True),
    Row("sinusoid", 1, 10, 25, 5, 0.01, query=10, sinusoid=True, model="mlp"),
    Row("resnet12-5w1s-1step", 5, 1, 4, 1, 0.01, size=84, channels=3, query=5, model="resnet12"),
    Row("resnet12-5w1s-5step", 5, 1, 4, 5, 0.01, size=84, channels=3, query=5, model="resnet12"),
    Row("user-5w1s-1step", 5, 1, 16, 1, 0.4, model="user"),
    Row("omniglot-quick", 5, 1, 8, 1, 0.4, hidden=32, query=5),
]}
PATHS = ["loop", "batched", "hybrid", "learn2learn", "higher", "learn2learn-cl"]
BASELINES = ("learn2learn", "higher", "learn2learn-cl")
OURS = ("loop", "batched", "hybrid")
CHECKPOINTED = [f"{p}+ckpt" for p in OURS]
VMAP = ["batched-vmap", "hybrid-vmap"]  # Engine(..., twin=False): conv4 and the MLP through vmap as any model
COMPILED = ["compiled", "compiled-batched"]  # Engine(..., compile=True) on the loop's or the batched path's plan


class UserNet(torch.nn.Module):
    """A model as a user might write it (no metalearn code): two conv blocks with nn.BatchNorm2d (tracking
    running statistics, the PyTorch default), a GroupNorm residual block, a third block, global pooling."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        nn = torch.nn

        def block(cin: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels), block(width), _Residual(width), block(width),
                                      nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class _Residual(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.GroupNorm(4, width)

    def forward(self, x):
        return x + torch.relu(self.norm(self.conv(x)))


def make_model(row: Row, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if row.model == "mlp":
        model = MLP()
    elif row.model == "resnet12":
        model = ResNet12(row.channels, row.ways, image_size=row.size)
    elif row.model == "user":
        model = UserNet(row.channels, row.ways)
    else:
        model = Conv4(row.channels, row.ways, row.hidden, row.size)
    return model.to(device)


def make_batch(row: Row, device: torch.device, seed: int) -> TaskBatch:
    g = torch.Generator(device=device).manual_seed(seed)
    T, N, K, Q = row.tasks, row.ways, row.shots, row.query
    if row.sinusoid:
        x = torch.rand(T, K + Q, 1, generator=g, device=device) * 10 - 5
        amp = torch.rand(T, 1, 1, generator=g, device=device) * 4.9 + 0.1
        phase = torch.rand(T, 1, 1, generator=g, device=device) * torch.pi
        y = amp * torch.sin(x - phase)
        return TaskBatch(Examples(x[:, :K], y[:, :K]), Examples(x[:, K:], y[:, K:]), 1, K, Q)
    shape = (row.channels, row.size, row.size)
    sx = torch.rand(T, N * K, *shape, generator=g, device=device)
    qx = torch.rand(T, N * Q, *shape, generator=g, device=device)
    labels = torch.arange(N, device=device)
    return TaskBatch(Examples(sx, labels.repeat_interleave(K).expand(T, -1)),
                     Examples(qx, labels.repeat_interleave(Q).expand(T, -1)), N, K, Q)


def map_batch(batch: TaskBatch, fx, fy=lambda t: t) -> TaskBatch:
    """batch with fx applied to its support and query inputs and fy to their targets."""
    return TaskBatch(Examples(fx(batch.support.x), fy(batch.support.y)), Examples(fx(batch.query.x), fy(batch.query.y)),
                     batch.ways, batch.shots, batch.query_shots)


def cast_batch(batch: TaskBatch, dtype: torch.dtype) -> TaskBatch:
    """batch with its floating-point tensors in `dtype` (integer labels unchanged)."""
    f = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return map_batch(batch, f, f)


def meta_step_fn(path: str, row: Row, model: torch.nn.Module):
    """fn(batch) that accumulates the meta-gradient of the mean query loss into model's .grad."""
    loss_fn = F.mse_loss if row.sinusoid else F.cross_entropy
    if path in COMPILED:
        algo = MAML(model, inner_lr=row.lr, inner_steps=row.steps, first_order=row.first_order,
                    loss="mse" if row.sinusoid else "cross_entropy")
        return Engine(algo, "batched" if path == "compiled-batched" else "loop", compile=True).meta_step
    if path.split("+")[0] in OURS:
        algo = MAML(model, inner_lr=row.lr, inner_steps=row.steps, first_order=row.first_order,
                    loss="mse" if row.sinusoid else "cross_entropy")
        return Engine(algo.set_checkpoint(path.endswith("+ckpt")), path.split("+")[0]).meta_step
    if path in VMAP:
        algo = MAML(model, inner_lr=row.lr, inner_steps=row.steps, first_order=row.first_order,
                    loss="mse" if row.sinusoid else "cross_entropy")
        return Engine(algo, path.split("-")[0], twin=False).meta_step
    if path in ("learn2learn", "learn2learn-cl"):
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(model, lr=row.lr, first_order=row.first_order)

        def step(batch: TaskBatch):
            if path == "learn2learn-cl":
                batch = map_batch(batch, channels_last)
            for t in range(batch.num_tasks):
                learner = maml.clone()
                for _ in range(row.steps):
                    learner.adapt(loss_fn(learner(batch.support.x[t]), batch.support.y[t]))
                (loss_fn(learner(batch.query.x[t]), batch.query.y[t]) / batch.num_tasks).backward()
        return step
    if path == "higher":
        import higher

        inner_opt = torch.optim.SGD(model.parameters(), lr=row.lr)
        detach = (lambda grads: [g.detach() for g in grads]) if row.first_order else None

        def step(batch: TaskBatch):
            for t in range(batch.num_tasks):
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(row.steps):
                        diffopt.step(loss_fn(fmodel(batch.support.x[t]), batch.support.y[t]), grad_callback=detach)
                    (loss_fn(fmodel(batch.query.x[t]), batch.query.y[t]) / batch.num_tasks).backward()
        return step
    raise ValueError(path)


def available(path: str, row: Row) -> bool:
    if path.split("+")[0] in OURS or path in COMPILED:
        return True
    if path in VMAP:  # the hand-written twins exist for conv4 and the MLP only; elsewhere batched is vmap
        return row.model in ("conv4", "mlp") and not (path == "hybrid-vmap" and row.sinusoid)
    if path == "learn2learn-cl" and row.sinusoid:
        return False
    try:
        __import__(path.split("-")[0])
        return True
    except Exception:
        return False


def check_agreement(row: Row, paths: list[str], device: torch.device, dtype: torch.dtype) -> dict:
    """Max relative difference of each path's meta-gradient to the loop's, same weights and batch.

    In float64 this is the correctness gate (every path computes the same function, so they agree to
    ~1e-15); in float32 it is informational: with BatchNorm over 5 support images and several inner
    steps at lr 0.4, float32 rounding alone moves the loop's own meta-gradient by up to ~1e-3
    relative on these noise batches (the same for every path, learn2learn's included)."""
    batch, grads = cast_batch(make_batch(row, device, seed=123), dtype), {}
    for path in paths:
        model = make_model(row, device).to(dtype)
        meta_step_fn(path, row, model)(batch)
        grads[path] = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = grads["loop"]
    return {p: ((g - ref).abs().max() / ref.abs().max()).item() for p, g in grads.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RssPeak:
    """Peak resident set size above its level at start (Linux /proc).

    The kernel keeps the peak (VmHWM); writing 5 to /proc/self/clear_refs resets it to the current size, so
    nothing runs beside the timed code. Where that is refused, a thread samples the size every millisecond
    instead: that thread competes with the compute threads (it wakes a thousand times a second and takes the
    interpreter lock), which slowed 2-thread runs measurably, so it is only the fallback."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread: "threading.Thread | None" = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.sampled = False
        except OSError:
            self.sampled = True
            self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = self.peak = self._rss()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    @staticmethod
    def _high_water_mark() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "RssPeak":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self._rss(), 0 if self.sampled else self._high_water_mark())


def meta_iteration(step, opt: torch.optim.Optimizer, batch: TaskBatch, device: torch.device) -> float:
    """Seconds of one timed meta-iteration: zero_grad, step(batch), the optimiser's step, a device synchronise."""
    sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    step(batch)
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def worker(row: Row, path: str, device: torch.device, reps: int, warmup: int) -> dict:
    """Time one (row, path) in this process; returns ms stats and peak memory."""
    model = make_model(row, device)
    step = meta_step_fn(path, row, model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [make_batch(row, device, seed=i) for i in range(4)]
    times, first = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss = RssPeak()
    with rss:
        for i in range(warmup + reps):
            seconds = meta_iteration(step, opt, batches[i % len(batches)], device)
            if i >= warmup:
                times.append(1000 * seconds)
            elif i == 0:  # compiled paths: includes the compilation
                first = round(seconds, 2)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    else:  # growth of the resident set during the meta-steps (interpreter, torch, model and batches excluded)
        peak, kind = (rss.peak - rss.start) / 2**20, "rss_growth_during_steps"
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "reps": reps,
            "tasks_per_s": 1000 * row.tasks / statistics.median(times), "first_step_s": first,
            "peak_mib": round(peak, 1), "memory": kind}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default=",".join(r for r in ROWS if r != "omniglot-quick"),
                    help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    ap.add_argument("--out", default="")
    ap.add_argument("--check", default="float64", choices=["float64", "float32"],
                    help="the agreement gate's dtype: float64 (default; 1e-8 relative) or float32 only, for rows "
                         "whose float64 passes take minutes (ResNet-12 at 84x84: its exactness is tested in "
                         "float64 at small width, tests/test_generic_batched.py)")
    ap.add_argument("--in-process", action="store_true",
                    help="time every path in this process instead of a fresh process each (for CUDA, where "
                         "max_memory_allocated is reset per path: on a lent GPU machine a fresh process costs ~15 s "
                         "of interpreter, torch and CUDA start; on a CPU the resident-set growth it reports can be "
                         "low, memory freed by earlier paths being reused)")
    ap.add_argument("--worker", nargs=2, metavar=("ROW", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(ROWS[args.worker[0]], args.worker[1], device, args.reps, args.warmup)))
        return 0

    unknown = ([r for r in args.rows.split(",") if r not in ROWS]
               + [p for p in args.paths.split(",") if p not in PATHS + CHECKPOINTED + COMPILED + VMAP])
    if unknown:
        print(f"bench_meta_step: unknown row or path: {', '.join(unknown)}", file=sys.stderr)
        return 2
    results = []
    header = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": str(device),
              "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                              else platform.processor() or platform.machine()),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "tf32": False, "in_process": args.in_process}
    for name in args.rows.split(","):
        row = ROWS[name]
        paths = [p for p in args.paths.split(",") if available(p, row)]
        if "loop" not in paths:
            paths.insert(0, "loop")
        agree32 = check_agreement(row, paths, device, torch.float32)
        agree = check_agreement(row, paths, device, torch.float64) if args.check == "float64" else {}
        bad = {p: d for p, d in agree.items() if d > 1e-8}
        if bad:
            print(f"bench_meta_step: {name}: paths disagree with the loop in float64 (max relative gradient "
                  f"difference {bad})", file=sys.stderr)
            return 1
        for path in paths:
            if args.in_process:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                res = worker(row, path, device, args.reps, args.warmup)
            else:
                cmd = [sys.executable, __file__, "--device", args.device, "--reps", str(args.reps), "--warmup",
                       str(args.warmup), "--threads", str(args.threads), "--worker", name, path]
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            res.update(row=name, path=path, grad_rel_diff_vs_loop_float64=agree.get(path),
                       grad_rel_diff_vs_loop_float32=agree32[path], setting=asdict(row))
            results.append(res)
            print(f"{name:26s} {path:12s} {res['ms_median']:9.1f} ms  "
                  f"(min {res['ms_min']:.1f}, max {res['ms_max']:.1f})"
                  f"  {res['tasks_per_s']:8.1f} tasks/s  peak {res['peak_mib']:.0f} MiB"
                  + (f"  first step {res['first_step_s']:.1f} s" if path in COMPILED else ""), flush=True)
            if args.out:  # after every path, so a run stopped by a time limit keeps what it finished
                atomic_json({**header, "complete": False, "results": with_speedups(results)}, args.out)
    if args.out:
        print(f"wrote {atomic_json({**header, 'complete': True, 'results': with_speedups(results)}, args.out)}")
    return 0


def with_speedups(results: list[dict]) -> list[dict]:
    """results, each with its speed-ups against the baselines (and the loop) of the same row."""
    for r in results:  # speed-ups against the baselines of the same row
        for base in (*BASELINES, "loop"):
            other = next((o for o in results if o["row"] == r["row"] and o["path"] == base), None)
            if other is not None and base != r["path"]:
                r[f"speedup_vs_{base}"] = round(other["ms_median"] / r["ms_median"], 3)
    return results


if __name__ == "__main__":
    sys.exit(main())
