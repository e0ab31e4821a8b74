"""Which evaluation numbers are bit-reproducible: one checkpoint, the same fixed episodes, evaluated with
other thread counts and execution paths, compared episode by episode.

    .venv/bin/python benchmarks/eval_reproducibility.py runs/reproduce/maml_omniglot_5w1s_cpu-seed0 \
        --out benchmarks/results/eval_reproducibility_cpu.json

Runs `metalearn eval CHECKPOINT` (600 test episodes by default) as: threads=1 on the checkpoint's path
(twice: the same setting must repeat to the bit), threads=2 on that path, and threads=1 on the per-task
loop. Reports, per variant against the first: how many episode accuracies differ, the largest
difference, and the mean accuracies.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from metalearn._io import atomic_json

VARIANTS = [("threads=1, run's path", ["threads=1"]), ("threads=1, run's path, again", ["threads=1"]),
            ("threads=2, run's path", ["threads=2"]), ("threads=1, loop", ["threads=1", "outer.execution=loop"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder or its checkpoint.pt")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(VARIANTS):
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, "-m", "metalearn", "eval", args.run, "--episodes", str(args.episodes),
                   "--no-progress", "--out", str(out), *overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"eval_reproducibility: error: {' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}")
            ev = json.loads(out.read_text())["eval"]
            results.append({"variant": name, "overrides": overrides, "mean": ev["mean"], "threads": ev.get("threads"),
                            "execution": ev.get("execution"), "accuracies": ev["accuracies"]})
    base = results[0]["accuracies"]
    for r in results:
        diff = [abs(a - b) for a, b in zip(r["accuracies"], base)]
        r["episodes_differing"] = sum(d != 0 for d in diff)
        r["max_difference"] = max(diff)
        print(f"{r['variant']:30s} execution {r['execution']:7s} threads {r['threads']}: mean {100 * r['mean']:.3f}%, "
              f"{r['episodes_differing']} of {len(base)} episodes differ "
              f"(largest {100 * r['max_difference']:.2f} points)")
    if args.out:
        record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "run": args.run, "variants": results}
        print(f"wrote {atomic_json(record, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
