"""Is the working tree's meta-step as fast as an older commit's? The same benchmark, old and new, interleaved.

    .venv/bin/python benchmarks/bench_old_vs_new.py --old efe364e --rows omniglot-5w1s-1step,sinusoid \\
        --paths loop,batched,hybrid --rounds 3 --reps 5 --threads 1 --out benchmarks/results/engine_old_vs_new_cpu.json

Why: a refactor (issue #14, the engine redesign) must not slow the CPU rows of
benchmarks/bench_meta_step.py down: new/old time ratio <= 1/0.95 per (row, path).

How: `--old` is checked out into a temporary git worktree (removed afterwards; nothing else is
written but `--out`). Each round runs `bench_meta_step.py --worker`-style measurements through each
tree's own bench_meta_step.py (old tree first in odd rounds, new tree first in even rounds), one
(row, path) at a time, so that both see the same machine load. Per (row, path) the result is the
median over rounds of each tree's median ms per meta-iteration, and `speed_ratio` = old ms / new ms
(>= 0.95 passes; > 1 means the new code is faster). The command, both commits, the torch version and
every round's numbers are written to `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from metalearn._io import atomic_json

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def measure(tree: Path, row: str, path: str, args: argparse.Namespace, out: Path) -> float:
    """Median ms per meta-iteration of (row, path), measured by `tree`'s own bench_meta_step.py."""
    cmd = [sys.executable, "benchmarks/bench_meta_step.py", "--device", "cpu", "--rows", row, "--paths", path,
           "--reps", str(args.reps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the tree's own metalearn, whatever is installed
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    results = [r for r in json.loads(out.read_text())["results"] if r["row"] == row and r["path"] == path]
    if not results or "ms_median" not in results[0]:
        raise SystemExit(f"bench_old_vs_new: {tree.name}: no timing for {row}/{path}")
    return results[0]["ms_median"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the commit to compare against (e.g. the one before a refactor)")
    ap.add_argument("--rows", default="omniglot-5w1s-1step,sinusoid")
    ap.add_argument("--paths", default="loop,batched,hybrid")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.rounds < 1 or args.reps < 1:
        raise SystemExit("bench_old_vs_new: --rounds and --reps must be >= 1")
    old_commit = git("rev-parse", args.old)
    new_commit = git("rev-parse", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")
    rows, paths = args.rows.split(","), args.paths.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-old-") as tmp:
        old_tree = Path(tmp) / "old"
        git("worktree", "add", "--detach", str(old_tree), old_commit)
        try:
            trees = {"old": old_tree, "new": ROOT}
            times: dict = {f"{r}/{p}": {"old": [], "new": []} for r in rows for p in paths}
            for k in range(args.rounds):
                order = ["old", "new"] if k % 2 == 0 else ["new", "old"]
                for key in times:
                    row, path = key.split("/")
                    for which in order:
                        ms = measure(trees[which], row, path, args, Path(tmp) / f"{which}.json")
                        times[key][which].append(ms)
                        print(f"round {k + 1} {key:32s} {which}: {ms:9.1f} ms", flush=True)
        finally:
            git("worktree", "remove", "--force", str(old_tree))
    results = []
    for key, t in times.items():
        old, new = statistics.median(t["old"]), statistics.median(t["new"])
        results.append({"row": key.split("/")[0], "path": key.split("/")[1], "old_ms": round(old, 2),
                        "new_ms": round(new, 2), "speed_ratio": round(old / new, 3), "rounds": t})
        print(f"{key:32s} old {old:9.1f} ms  new {new:9.1f} ms  old/new {old / new:.3f}")
    if args.out:
        import torch

        atomic_json({"command": " ".join([Path(sys.executable).name, *sys.argv]), "old_commit": old_commit,
                     "new_commit": new_commit, "threads": args.threads, "torch": torch.__version__,
                     "results": results}, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
