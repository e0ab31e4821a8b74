"""Speed-up against learn2learn on a noisy machine: bench_meta_step.py's paths timed in one process, in
alternating rounds, and the ratio taken within each round.

    .venv/bin/python benchmarks/bench_interleaved.py --row omniglot-5w1s-1step --paths hybrid,learn2learn \\
        --threads 2 --rounds 15 --out benchmarks/results/interleaved_row1_2threads_cpu.json

Why it exists: bench_meta_step.py times each path in its own subprocess, one after the other. On this shared
2-core machine the same path moved by up to 20% between two runs of the same command a minute apart
(hybrid 2030 ms, then 2513 ms, on row 1 at 2 threads) while varying by 2% within a run, so a ratio of two
paths timed minutes apart carries that drift. Here every round runs each path once (the order rotates from
round to round) on the same meta-batch, and a path's speed-up is the median over rounds of
time(learn2learn) / time(path) within the round, next to the median times and the median count of minor
page faults per meta-iteration (the allocator's doing; it moves the time). Peak memory is not measured
(all paths share the process); bench_meta_step.py reports it. glibc's MALLOC_* environment variables are
recorded with the results: they change the time a lot here (see the README, "The CPU allocator").

Each path gets its own model (the same initial weights), its own Adam and the row's meta-batches, as in
bench_meta_step.py's worker; one warm-up round is not counted.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_meta_step as bench  # noqa: E402

from metalearn._io import atomic_json  # noqa: E402
from metalearn.checkpoint import git_info  # noqa: E402


def alternate(runs: dict, batches: list, device: torch.device, rounds: int) -> "tuple[dict, dict]":
    """runs {name: (step, optimiser)}: one warm-up round, then `rounds` rounds each running every name once (the
    order rotates from round to round, the batch cycles through `batches`). Seconds and minor page faults per
    meta-iteration, {name: [per round]} each."""
    names = list(runs)
    times, faults = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = bench.meta_iteration(*runs[name], batches[r % len(batches)], device)
            if r:  # round 0 warms up
                times[name].append(seconds)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        if r:
            print(f"round {r:3d}: " + "  ".join(f"{n} {1000 * times[n][-1]:8.1f} ms" for n in names), flush=True)
    return times, faults


def summarise(times: dict, faults: dict, baseline: str = "learn2learn") -> list:
    """Per name: median, min and max ms, the median over rounds of time(baseline) / time(name) with its range,
    and the median page faults per meta-iteration."""
    results = []
    for name in times:
        ratios = [b / t for b, t in zip(times[baseline], times[name])]
        results.append({"path": name, "ms_median": round(1000 * statistics.median(times[name]), 1),
                        "ms_min": round(1000 * min(times[name]), 1), "ms_max": round(1000 * max(times[name]), 1),
                        "speedup_vs_learn2learn_median_of_rounds": round(statistics.median(ratios), 3),
                        "speedup_vs_learn2learn_min": round(min(ratios), 3),
                        "speedup_vs_learn2learn_max": round(max(ratios), 3),
                        "minor_page_faults_median": int(statistics.median(faults[name]))})
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", default="omniglot-5w1s-1step", choices=list(bench.ROWS))
    ap.add_argument("--paths", default="hybrid,learn2learn", help="learn2learn is added if missing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.rounds < 1:
        print("metalearn: error: --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    row, device = bench.ROWS[args.row], torch.device(args.device)
    paths = [p for p in args.paths.split(",") if p]
    if "learn2learn" not in paths:
        paths.append("learn2learn")
    missing = [p for p in paths if not bench.available(p, row)]
    if missing:
        print(f"metalearn: error: not available for {row.name}: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = {}
    for path in paths:
        model = bench.make_model(row, device)
        runs[path] = (bench.meta_step_fn(path, row, model), torch.optim.Adam(model.parameters(), lr=1e-3))
    batches = [bench.make_batch(row, device, seed=i) for i in range(4)]
    times, faults = alternate(runs, batches, device, args.rounds)
    results = summarise(times, faults)
    for res in results:
        path = res["path"]
        print(f"{row.name:22s} {path:12s} {res['ms_median']:9.1f} ms median; vs learn2learn "
              f"{res['speedup_vs_learn2learn_median_of_rounds']:.3f}x (median of {args.rounds} rounds; "
              f"range {res['speedup_vs_learn2learn_min']:.3f}-{res['speedup_vs_learn2learn_max']:.3f}; "
              f"{res['minor_page_faults_median']} page faults per step)")
    if args.out:
        record = {"command": "python " + " ".join(sys.argv), "row": row.name, "device": str(device),
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "git": git_info(), "rounds": args.rounds,
                  "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, "results": results}
        print(f"wrote {atomic_json(record, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
