"""What the float32 fix of the hybrid path costs: BatchNorm of channels-last activations from exact sums
(metalearn/models/conv4.py `normalise`) against PyTorch's channels-last kernel (the old path, 5e-3 off
float64 on real Omniglot batches).

    .venv/bin/python benchmarks/bench_hybrid_bn.py --threads 2 --reps 7 --out benchmarks/results/hybrid_bn_cpu.json

Row 1 of bench_meta_step (Omniglot 5-way 1-shot, 32 tasks, conv4 with 64 filters, one second-order inner
step, 15 query examples per class) on real Omniglot training episodes ($METALEARN_DATA), hybrid
execution; the two variants alternate rep by rep in one process, so machine load hits both alike.
Reported: median ms per meta-step (forward, backward and an Adam step) and the float32 meta-gradient's
relative L2 error against float64 (all parameters but the conv biases), beside the per-task loop's own
float32 error on the same batch (the floor).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from metalearn._io import atomic_json
from metalearn.algorithms import MAML
from metalearn.config import load_config
from metalearn.data import EpisodeSampler, open_dataset
from metalearn.engine import Engine
from metalearn.models import conv4
from metalearn.types import TaskBatch

ROOT = Path(__file__).resolve().parents[1]

EXACT = conv4.normalise


def native(norm, h):
    """The old path: PyTorch's BatchNorm kernel on whatever layout h has."""
    return norm(h)


def meta_gradient(batch, dtype, execution="hybrid"):
    torch.manual_seed(0)
    model = conv4.Conv4(hidden=64).to(dtype)
    algo = Engine(MAML(model, inner_lr=0.4, inner_steps=1), execution)
    algo.meta_step(batch)
    return model, {n: p.grad.double() for n, p in model.named_parameters()}


def rel(g, ref):
    keys = [n for n in ref if not n.endswith("conv.bias")]
    return (torch.sqrt(sum(((g[n] - ref[n]) ** 2).sum() for n in keys))
            / torch.sqrt(sum((ref[n] ** 2).sum() for n in keys))).item()


def time_variants(variants: dict, activate, batch, reps: int, errors: dict) -> "list[dict]":
    """Hybrid meta-steps (+ Adam) on `batch`, the variants alternating rep by rep in this process (after one
    warm-up rep each), `activate(variants[name])` before each; prints and returns a row per variant."""
    model = conv4.Conv4(hidden=64)
    algo = Engine(MAML(model, inner_lr=0.4, inner_steps=1), "hybrid")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    times = {k: [] for k in variants}
    for rep in range(reps + 1):
        for name, v in variants.items():
            activate(v)
            t = time.perf_counter()
            opt.zero_grad()
            algo.meta_step(batch)
            opt.step()
            if rep:
                times[name].append(1000 * (time.perf_counter() - t))
    rows = [{"variant": k, "median_ms": statistics.median(v), "ms": [round(x, 1) for x in v],
             "rel_l2_vs_float64": errors[k]} for k, v in times.items()]
    for r in rows:
        print(f"{r['variant']:42s} {r['median_ms']:8.1f} ms/step   float32 error {r['rel_l2_vs_float64']:.2e}")
    return rows


def setting(doc: str, threads: int) -> "tuple[argparse.Namespace, TaskBatch, TaskBatch]":
    """(--threads/--reps/--tasks/--out, and one real Omniglot training batch of row 1 in float32 and float64)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "experiments" / "configs" / "omniglot_5w1s_quick.yaml")
    ds, splits = open_dataset(cfg.data)
    images = ds.images[splits["train"]]
    return args, *(EpisodeSampler(images, 5, 1, 15, seed=0, split="train", dtype=dt).sample(args.tasks)
                   for dt in (torch.float32, torch.float64))


def compare(args: argparse.Namespace, batch32: TaskBatch, batch64: TaskBatch, variants: dict, activate,
            label: str) -> int:
    """Each variant's float32 error against the loop's float64 meta-gradient, then their times alternating
    (`time_variants`); prints "label: x<first/second>" and writes the JSON to args.out. Leaves the first active."""
    _, ref = meta_gradient(batch64, torch.float64, "loop")
    loop_error = rel(meta_gradient(batch32, torch.float32, "loop")[1], ref)  # float32's own floor
    errors = {}
    for name, v in variants.items():
        activate(v)
        errors[name] = rel(meta_gradient(batch32, torch.float32)[1], ref)
    rows = time_variants(variants, activate, batch32, args.reps, errors)
    activate(next(iter(variants.values())))
    ratio = rows[0]["median_ms"] / rows[1]["median_ms"]
    print(f"{label}: x{ratio:.3f} per meta-step; the loop's own float32 error: {loop_error:.2e}")
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": "cpu",
           "device_name": platform.machine(), "torch": torch.__version__, "threads": args.threads,
           "tasks": args.tasks, "rows": rows, "time_ratio": ratio, "loop_rel_l2_vs_float64": loop_error}
    if args.out:
        print(f"wrote {atomic_json(out, args.out)}")
    return 0


def main() -> int:
    args, batch32, batch64 = setting(__doc__, threads=2)
    variants = {"exact-sums batchnorm (now)": EXACT, "channels-last-batchnorm (before)": native}
    return compare(args, batch32, batch64, variants, lambda fn: setattr(conv4, "normalise", fn),
                   "cost of the exact BatchNorm")


if __name__ == "__main__":
    sys.exit(main())
