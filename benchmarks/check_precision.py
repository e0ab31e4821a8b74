"""How far reduced precision (metalearn/precision.py) moves the MAML meta-gradient.

    .venv/bin/python benchmarks/check_precision.py --device cpu --out benchmarks/results/precision_cpu.json
    python benchmarks/check_precision.py --device cuda --out benchmarks/results/precision_h200.json  # adds tf32
    .venv/bin/python benchmarks/check_precision.py --real --threads 1 --out benchmarks/results/precision_real_cpu.json
    python benchmarks/check_precision.py --real --device cuda --out benchmarks/results/precision_real_h200.json

For each setting (bench_meta_step's rows, with fewer tasks on a CPU) the meta-gradient of one
meta-batch (the same weights and data) is computed in float64 (the reference), then in each
precision on float32 weights, with the execution path `auto` picks on that device. Reported per
precision: the relative L2 error ||g - g64|| / ||g64||, the largest elementwise error relative to
the largest reference entry, and the cosine similarity. fp32 shows the floor (float32 rounding);
bf16 and tf32 show what the opt-in modes cost. Only the meta-step changes with precision:
evaluation always runs in float32/float64.

`--real` checks float32 itself on real data instead: meta-batches of real Omniglot training episodes
(the quick preset's setting: conv4 with 32 filters, 5-way 1-shot, 5 query examples per class, one
inner step of 0.4, 4 tasks; $METALEARN_DATA), the float32 meta-gradient of every execution path
(loop, batched, hybrid) against the float64 loop. Its error is the relative L2 over all parameters
except the conv biases (right before BatchNorm their true gradient is zero: pure rounding noise).
Noise batches hid the hybrid path's channels-last BatchNorm error (5e-3 on real data; issue #19).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import torch

from bench_meta_step import ROWS, cast_batch, make_batch, make_model  # a sibling: this script's folder is on sys.path
from metalearn._io import atomic_json
from metalearn.algorithms import ALGORITHMS, MAML
from metalearn.engine import Engine
from metalearn.errors import MetalearnError
from metalearn.precision import meta_step_context, set_precision
from metalearn.types import TaskBatch

ROOT = Path(__file__).resolve().parents[1]


def meta_gradient(row, batch: TaskBatch, device: torch.device, dtype: torch.dtype, precision: str) -> torch.Tensor:
    model = make_model(row, device).to(dtype)
    algo = Engine(MAML(model, inner_lr=row.lr, inner_steps=row.steps, first_order=row.first_order,
                       loss="mse" if row.sinusoid else "cross_entropy"))  # execution auto
    set_precision(precision, device)
    with meta_step_context(precision, device):
        algo.meta_step(cast_batch(batch, dtype))
    set_precision("fp32", device)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def real_data_check(args: argparse.Namespace, device: torch.device) -> dict:
    """float32 vs float64 meta-gradients of every execution path on real Omniglot batches (TF32 off on CUDA)."""
    from metalearn.config import load_config
    from metalearn.data import EpisodeSampler, open_dataset
    from metalearn.models.conv4 import Conv4

    cfg = load_config(ROOT / "experiments" / "configs" / "omniglot_5w1s_quick.yaml")
    ds, splits = open_dataset(cfg.data)
    images = ds.images[splits["train"]]

    def grad(mode: str, dtype: torch.dtype, seed: int, algorithm: str) -> dict:
        torch.manual_seed(0)
        model = Conv4(hidden=32).to(device, dtype)
        algo = Engine(ALGORITHMS[algorithm](model, inner_lr=0.4, inner_steps=1), mode)
        algo.meta_step(EpisodeSampler(images, 5, 1, 5, seed=seed, split="train", dtype=dtype).sample(args.tasks or 4)
                       .to(device))
        named = dict(model.named_parameters())
        named.update({f"learnable.{i}": p for i, p in enumerate(algo.meta_parameters())})
        return {n: p.grad.double() for n, p in named.items()}

    def rel(g: dict, ref: dict, only: str = "") -> float:
        keys = [n for n in ref if not n.endswith("conv.bias") and n.startswith(only)]
        return (torch.sqrt(sum(((g[n] - ref[n]) ** 2).sum() for n in keys))
                / torch.sqrt(sum((ref[n] ** 2).sum() for n in keys))).item()

    results = []
    for algorithm in ("maml", "metasgd"):
        for seed in range(args.seeds):
            ref = grad("loop", torch.float64, seed, algorithm)
            row = {"algorithm": algorithm, "seed": seed, "tasks": args.tasks or 4}
            for mode in ("loop", "batched", "hybrid"):
                g = grad(mode, torch.float32, seed, algorithm)
                row[mode] = rel(g, ref)
                if algorithm == "metasgd":  # the learned lrs' gradient alone: its norm is a few % of the model's,
                    row[f"{mode}_lrs"] = rel(g, ref, "learnable.")  # so the global figure hardly sees it
            results.append(row)
            print(f"{algorithm:8s} seed {seed}  " + "  ".join(
                f"{m} {row[m]:.2e}" + (f" (lrs {row[m + '_lrs']:.2e})" if m + "_lrs" in row else "")
                for m in ("loop", "batched", "hybrid")), flush=True)
    return {"check": "float32 vs float64 meta-gradient on real Omniglot batches, relative L2 without conv biases "
                     "(Meta-SGD: also its learned lrs' gradient alone, *_lrs)",
            "threads": torch.get_num_threads(), "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="omniglot-5w1s-1step,omniglot-5w1s-5step,sinusoid")
    ap.add_argument("--tasks", type=int, default=0, help="tasks per meta-batch (0 = the row's; 4 on a CPU)")
    ap.add_argument("--seeds", type=int, default=3, help="meta-batches per row")
    ap.add_argument("--out", default="")
    ap.add_argument("--real", action="store_true", help="float32 of every execution path on real Omniglot batches")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    unknown = [name for name in args.rows.split(",") if name not in ROWS]
    if unknown:
        print(f"metalearn: error: unknown --rows {', '.join(unknown)} (known: {', '.join(ROWS)})", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.real:
        set_precision("fp32", device)
        try:
            check = real_data_check(args, device)
        except MetalearnError as e:  # no data folder, say: before any work
            print(f"metalearn: error: {e}", file=sys.stderr)
            return 2
        out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
               "torch": torch.__version__, **check}
        if args.out:
            print(f"wrote {atomic_json(out, args.out)}")
        return 0
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
