"""Meta-training throughput (tasks/s) with 1, 2, ... processes under torchrun (metalearn/distributed.py).

Each setting launches `python -m torch.distributed.run --nproc_per_node N` on this script in worker
mode; every process builds the config's model and algorithm, draws the global meta-batch from the
same seeded sampler (synthetic uint8 images of the data set's shape, or sinusoid tasks), adapts its
slice of it and all-reduces the meta-gradient (train.sharded_meta_step), then steps the optimiser,
exactly as `metalearn train` does. Timed: `--steps` outer steps after `--warmup`, between barriers.

    python benchmarks/bench_distributed.py experiments/configs/omniglot_5w1s_quick.yaml --nprocs 1 2 \\
        --steps 20 --out benchmarks/results/distributed_cpu.json
    python benchmarks/bench_distributed.py experiments/configs/maml_omniglot_5w1s.yaml device=cuda \\
        --nprocs 1 2 4 8 --out benchmarks/results/distributed_cuda.json      # one GPU per process (nccl)

On CPU each process gets `--threads` torch threads (default: the machine's cores // N, at least 1),
so N processes use about as many cores as 1 process with all of them. The JSON holds the exact
command, the device, torch version, threads and, per N, ms/step and tasks/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _worker(args: argparse.Namespace) -> None:
    from metalearn import distributed
    from metalearn.config import load_config
    from metalearn.data.benchmark import synthetic_benchmark
    from metalearn.models import build_model
    from metalearn.train import build_algorithm, resolve_device, seed_everything, sharded_meta_step

    cfg = load_config(args.config, args.overrides)
    dist = distributed.init(cfg.device)
    try:
        torch.set_num_threads(args.threads)
        seed_everything(cfg.seed)
        device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
        benchmark = synthetic_benchmark(cfg)  # random pixels of the data set's shape (or sinusoid tasks)
        benchmark.load(device)
        sampler = benchmark.sampler(cfg.seed, dtype)
        model = build_model(cfg.model, benchmark.channels, benchmark.outputs, cfg.data.image_size).to(device=device,
                                                                                                      dtype=dtype)
        algorithm = build_algorithm(cfg, model)
        params = list(model.parameters())
        optimizer = algorithm.outer_optimizer(params, cfg.outer.lr)
        reduced = params + algorithm.meta_parameters()
        total = args.warmup + args.steps
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def one_step(step: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            algorithm.schedule(step, total, optimizer)
            sharded_meta_step(algorithm, sampler, cfg.outer.meta_batch_size, reduced, [], dist)
            optimizer.step()

        for step in range(1, args.warmup + 1):
            one_step(step)
        sync()
        distributed.barrier(dist)
        t0 = time.perf_counter()
        for step in range(args.warmup + 1, total + 1):
            one_step(step)
        sync()
        distributed.barrier(dist)
        seconds = time.perf_counter() - t0
        if dist.is_main:
            plan = algorithm.plan()[0]  # build_algorithm returns an Engine
            Path(args.worker_out).write_text(json.dumps({
                "processes": dist.world_size, "backend": dist.backend or "none (1 process)",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads_per_process": torch.get_num_threads(), "execution": plan, "seconds": seconds,
                "ms_per_step": 1000 * seconds / args.steps,
                "tasks_per_s": args.steps * cfg.outer.meta_batch_size / seconds}))
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML preset")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to time (default 1 2)")
    p.add_argument("--steps", type=int, default=20, help="timed outer steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed outer steps first (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default cores // N)")
    p.add_argument("--out", help="write the JSON result here (e.g. benchmarks/results/distributed_cpu.json)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. how busy the machine was)")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        return _worker(args)

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"command: {command}", flush=True)
    cores = os.cpu_count() or 1
    runs = []
    for n in args.nprocs:
        threads = args.threads or max(1, cores // n)
        with tempfile.TemporaryDirectory() as tmp:
            piece = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), __file__, args.config, *args.overrides,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads),
                   "--worker-out", str(piece)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{n} process(es) failed:\n{proc.stderr[-4000:]}")
            run = json.loads(piece.read_text())
        runs.append(run)
        print(f"{n} process(es) x {run['threads_per_process']} thread(s) on {run['device']} ({run['backend']}, "
              f"{run['execution']}): {run['ms_per_step']:.1f} ms/step, {run['tasks_per_s']:.1f} tasks/s", flush=True)
    base = runs[0]["tasks_per_s"]
    for r in runs:
        r["speedup_vs_first"] = r["tasks_per_s"] / base
    result = {"command": command, "config": args.config, "overrides": args.overrides, "steps": args.steps,
              "warmup": args.warmup, "cpu": platform.processor() or platform.machine(), "cores": cores,
              "torch": torch.__version__, "note": args.note, "runs": runs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
