"""How far reduced precision (metalearn/precision.py) moves the MAML meta-gradient.

    .venv/bin/python benchmarks/check_precision.py --device cpu --out benchmarks/results/precision_cpu.json
    python benchmarks/check_precision.py --device cuda --out benchmarks/results/precision_h100.json  # adds tf32

For each setting (bench_meta_step's rows, with fewer tasks on a CPU) the meta-gradient of one
meta-batch (the same weights and data) is computed in float64 (the reference), then in each
precision on float32 weights, with the execution path `auto` picks on that device. Reported per
precision: the relative L2 error ||g - g64|| / ||g64||, the largest elementwise error relative to
the largest reference entry, and the cosine similarity. fp32 shows the floor (float32 rounding);
bf16 and tf32 show what the opt-in modes cost. Only the meta-step changes with precision:
evaluation always runs in float32/float64.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_meta_step import ROWS, cast_batch, make_batch, make_model  # noqa: E402
from metalearn._io import atomic_json  # noqa: E402
from metalearn.algorithms import MAML  # noqa: E402
from metalearn.precision import meta_step_context, set_precision  # noqa: E402
from metalearn.types import TaskBatch  # noqa: E402


def meta_gradient(row, batch: TaskBatch, device: torch.device, dtype: torch.dtype, precision: str) -> torch.Tensor:
    model = make_model(row, device).to(dtype)
    algo = MAML(model, inner_lr=row.lr, inner_steps=row.steps, first_order=row.first_order,
                loss="mse" if row.sinusoid else "cross_entropy")
    set_precision(precision, device)
    with meta_step_context(precision, device):
        algo.meta_step(cast_batch(batch, dtype))
    set_precision("fp32", device)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="omniglot-5w1s-1step,omniglot-5w1s-5step,sinusoid")
    ap.add_argument("--tasks", type=int, default=0, help="tasks per meta-batch (0 = the row's; 4 on a CPU)")
    ap.add_argument("--seeds", type=int, default=3, help="meta-batches per row")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device(args.device)
    precisions = ["fp32", "bf16"] + (["tf32"] if device.type == "cuda" else [])
    results = []
    for name in args.rows.split(","):
        row = ROWS[name]
        tasks = args.tasks or (row.tasks if device.type == "cuda" else min(row.tasks, 4))
        row = dataclasses.replace(row, tasks=tasks)
        for seed in range(args.seeds):
            batch = make_batch(row, device, seed=1000 + seed)
            ref = meta_gradient(row, batch, device, torch.float64, "fp32")
            for precision in precisions:
                g = meta_gradient(row, batch, device, torch.float32, precision)
                res = {"row": name, "tasks": tasks, "seed": seed, "precision": precision,
                       "rel_l2": ((g - ref).norm() / ref.norm()).item(),
                       "rel_max": ((g - ref).abs().max() / ref.abs().max()).item(),
                       "cosine": torch.nn.functional.cosine_similarity(g, ref, dim=0).item()}
                results.append(res)
                print(f"{name:24s} seed {seed} {precision:5s} rel L2 {res['rel_l2']:.2e}  rel max {res['rel_max']:.2e}"
                      f"  cosine {res['cosine']:.6f}", flush=True)
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
           "torch": torch.__version__, "results": results}
    if args.out:
        print(f"wrote {atomic_json(out, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
