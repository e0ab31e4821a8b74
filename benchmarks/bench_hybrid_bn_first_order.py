"""What the fused first-order BatchNorm of hybrid's query passes (metalearn/models/batchnorm.py BatchNormFirstOrder)
gains, against the reduction form differentiated by autograd (its reference, what hybrid ran before).

    .venv/bin/python benchmarks/bench_hybrid_bn_first_order.py --threads 1 --reps 7 \\
        --out benchmarks/results/hybrid_bn_first_order_cpu.json

The setting of bench_hybrid_bn.py (row 1 of bench_meta_step: real Omniglot 5-way 1-shot, 32 tasks, conv4 with 64
filters, one second-order step, 15 query examples per class), hybrid execution; the two variants alternate rep
by rep in one process, so machine load hits both alike. Reported: median ms per meta-step (forward, backward
and an Adam step) and each variant's float32 meta-gradient error against float64, beside the loop's own.
"""
from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hybrid_bn import meta_gradient, rel, setting, time_variants  # noqa: E402

from metalearn import engine  # noqa: E402
from metalearn._io import atomic_json  # noqa: E402

FUSED = engine.first_order_norms


def main() -> int:
    args, batch32, batch64 = setting(__doc__, threads=1)
    _, ref = meta_gradient(batch64, torch.float64, "loop")
    loop_error = rel(meta_gradient(batch32, torch.float32, "loop")[1], ref)
    variants = {"fused first-order backward (now)": FUSED,
                "autograd of the reduction form (before)": contextlib.nullcontext}
    errors = {}
    for name, ctx in variants.items():
        engine.first_order_norms = ctx
        errors[name] = rel(meta_gradient(batch32, torch.float32)[1], ref)
    rows = time_variants(variants, lambda ctx: setattr(engine, "first_order_norms", ctx), batch32, args.reps, errors)
    engine.first_order_norms = FUSED
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
