"""What the fused first-order BatchNorm of hybrid's query passes (metalearn/inner/norm.py BatchNormFirstOrder)
gains, against the reduction form differentiated by autograd (its reference, what hybrid ran before).

    .venv/bin/python benchmarks/bench_hybrid_bn_first_order.py --threads 1 --reps 7 \\
        --out benchmarks/results/hybrid_bn_first_order_cpu.json

The setting of bench_hybrid_bn.py (row 1 of bench_meta_step: real Omniglot 5-way 1-shot, 32 tasks, conv4 with 64
filters, one second-order step, 15 query examples per class), hybrid execution; the two variants alternate rep
by rep in one process, so machine load hits both alike. Reported: median ms per meta-step (forward, backward
and an Adam step) and each variant's float32 meta-gradient error against float64, beside the loop's own.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hybrid_bn import ROOT, meta_gradient, rel  # noqa: E402

from metalearn import engine  # noqa: E402
from metalearn._io import atomic_json  # noqa: E402
from metalearn.algorithms import MAML  # noqa: E402
from metalearn.config import load_config  # noqa: E402
from metalearn.data import EpisodeSampler, open_dataset  # noqa: E402
from metalearn.models import conv4  # noqa: E402

FUSED = engine.first_order_norms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "experiments" / "configs" / "omniglot_5w1s_quick.yaml")
    ds, splits = open_dataset(cfg.data)
    images = ds.images[splits["train"]]
    batch32 = EpisodeSampler(images, 5, 1, 15, seed=0, split="train", dtype=torch.float32).sample(args.tasks)
    batch64 = EpisodeSampler(images, 5, 1, 15, seed=0, split="train", dtype=torch.float64).sample(args.tasks)
    _, ref = meta_gradient(batch64, torch.float64, "loop")
    loop_error = rel(meta_gradient(batch32, torch.float32, "loop")[1], ref)
    variants = {"fused first-order backward (now)": FUSED,
                "autograd of the reduction form (before)": contextlib.nullcontext}
    errors, times = {}, {k: [] for k in variants}
    for name, ctx in variants.items():
        engine.first_order_norms = ctx
        errors[name] = rel(meta_gradient(batch32, torch.float32)[1], ref)
    model = conv4.Conv4(hidden=64)
    algo = engine.Engine(MAML(model, inner_lr=0.4, inner_steps=1), "hybrid")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for rep in range(args.reps + 1):  # the first rep of each is a warm-up
        for name, ctx in variants.items():
            engine.first_order_norms = ctx
            t = time.perf_counter()
            opt.zero_grad()
            algo.meta_step(batch32)
            opt.step()
            if rep:
                times[name].append(1000 * (time.perf_counter() - t))
    engine.first_order_norms = FUSED
    rows = [{"variant": k, "median_ms": statistics.median(v), "ms": [round(x, 1) for x in v],
             "rel_l2_vs_float64": errors[k]} for k, v in times.items()]
    for r in rows:
        print(f"{r['variant']:42s} {r['median_ms']:8.1f} ms/step   float32 error {r['rel_l2_vs_float64']:.2e}")
    ratio = rows[0]["median_ms"] / rows[1]["median_ms"]
    print(f"time of the fused backward: x{ratio:.3f} per meta-step; the loop's own float32 error: {loop_error:.2e}")
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": "cpu",
           "device_name": platform.machine(), "torch": torch.__version__, "threads": args.threads,
           "tasks": args.tasks, "rows": rows, "time_ratio": ratio, "loop_rel_l2_vs_float64": loop_error}
    if args.out:
        print(f"wrote {atomic_json(out, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
