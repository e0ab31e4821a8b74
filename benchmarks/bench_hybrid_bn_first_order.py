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
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hybrid_bn import compare, setting  # noqa: E402

from metalearn import engine  # noqa: E402

FUSED = engine.first_order_norms


def main() -> int:
    args, batch32, batch64 = setting(__doc__, threads=1)
    variants = {"fused first-order backward (now)": FUSED,
                "autograd of the reduction form (before)": contextlib.nullcontext}
    return compare(args, batch32, batch64, variants, lambda ctx: setattr(engine, "first_order_norms", ctx),
                   "time of the fused backward")


if __name__ == "__main__":
    sys.exit(main())
