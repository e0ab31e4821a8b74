"""Peak memory of one meta-step: iMAML (implicit meta-gradient, first-order inner loop) against second-order
MAML (differentiating through the inner loop), as the number of inner steps grows; first-order MAML beside
them as the floor (the same inner loop, no meta-gradient solve).

    .venv/bin/python benchmarks/bench_imaml_memory.py --device cpu --threads 2 \\
        --out benchmarks/results/imaml_memory_cpu.json
    python benchmarks/bench_imaml_memory.py --device cuda --out benchmarks/results/imaml_memory_cuda.json

Setting: conv4 with 64 filters and BatchNorm, Omniglot 5-way 1-shot shapes (28x28x1, 15 query examples per
class; uniform noise images, which do not change the work done), 4 tasks, both algorithms run task by task
(metalearn's per-task loop, which holds one task's graph at a time), inner SGD lr 0.1; iMAML with lam 2 and
5 CG steps (the paper's Omniglot values). Inner steps: 1, 5, 20, 50.

Each (algorithm, steps) runs in a fresh subprocess (bench_meta_step.py's method): on CPU the memory is how
much the process's peak resident set size grew during the meta-steps (the interpreter, torch, the model and
the batches excluded; the kernel's high-water mark, reset when the meta-steps start); on CUDA,
max_memory_allocated. The time per meta-step is printed beside it (informational; the CPU may be shared).
Expected: MAML grows linearly with the steps (every step's activations and its backward graph are kept for
the outer backward); iMAML stays flat (the inner loop keeps nothing; the CG solve holds one support pass's
double-backward graph), as FOMAML does.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_meta_step import RssPeak, Row, make_batch, make_model, sync  # a sibling: this script's folder is on sys.path
from metalearn._io import atomic_json
from metalearn.algorithms import IMAML, MAML
from metalearn.engine import Engine

STEPS = (1, 5, 20, 50)
ALGORITHMS = ("imaml", "maml", "fomaml")
TASKS, LR, LAM, CG_STEPS = 4, 0.1, 2.0, 5


def row(steps: int) -> Row:
    return Row(f"omniglot-5w1s-{steps}step", 5, 1, TASKS, steps, LR)


def worker(algorithm: str, steps: int, device: torch.device, reps: int) -> dict:
    """One (algorithm, steps) in this process: peak memory growth and ms per meta-step."""
    r = row(steps)
    model = make_model(r, device)
    if algorithm == "imaml":
        algo = Engine(IMAML(model, inner_lr=LR, inner_steps=steps, lam=LAM, cg_steps=CG_STEPS))
    else:
        algo = Engine(MAML(model, inner_lr=LR, inner_steps=steps, first_order=algorithm == "fomaml"), "loop")
    batches = [make_batch(r, device, seed=i) for i in range(reps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, metrics = [], {}
    with RssPeak() as rss:
        for batch in batches:
            sync(device)
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            metrics = algo.meta_step(batch)
            sync(device)
            times.append(1000 * (time.perf_counter() - t0))
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    else:
        peak, kind = (rss.peak - rss.start) / 2**20, "rss_growth_during_steps"
    return {"peak_mib": round(peak, 1), "memory": kind, "ms_median": round(statistics.median(times), 1),
            "reps": reps, "last_metrics": metrics}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated inner-step counts")
    ap.add_argument("--reps", type=int, default=2, help="meta-steps per setting (the peak covers all of them)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", nargs=2, metavar=("ALGORITHM", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), device, args.reps)))
        return 0

    results = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for algorithm in ALGORITHMS:
            cmd = [sys.executable, __file__, "--device", args.device, "--reps", str(args.reps), "--threads",
                   str(args.threads), "--worker", algorithm, str(steps)]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res.update(algorithm=algorithm, inner_steps=steps)
            results.append(res)
            print(f"{algorithm:6s} {steps:3d} inner steps  peak {res['peak_mib']:8.1f} MiB  "
                  f"{res['ms_median']:9.1f} ms/meta-step", flush=True)
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": str(device),
           "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else platform.processor() or platform.machine()),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
           "setting": {"model": "conv4, 64 filters, BatchNorm", "ways": 5, "shots": 1, "query_shots": 15,
                       "tasks": TASKS, "inner_lr": LR, "imaml_lam": LAM, "imaml_cg_steps": CG_STEPS,
                       "maml": "second order, per-task loop", "fomaml": "first order, per-task loop",
                       "images": "uniform noise, 28x28x1"},
           "results": results}
    if args.out:
        print(f"wrote {atomic_json(out, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
