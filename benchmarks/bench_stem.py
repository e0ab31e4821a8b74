"""conv4's first block from patch statistics (metalearn/models/stem.py) against the plain block it replaced on the
hybrid path's query passes: the block alone, and whole meta-steps of a row with it on and off.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_stem.py --threads 1 --rounds 6 \\
        --out benchmarks/results/stem_cpu.json

1. block: forward + backward (gradients of the conv and BatchNorm parameters, as in a query pass) of conv4's first
   block on 75 real Omniglot training images (5-way, 15 query examples per class), float32, channels-last:
   `plain` = what hybrid's query passes ran before (conv2d, `channels_last_batch_norm` inside `first_order_norms()`,
   max-pool, ReLU), `stem` = `conv_norm_pool`. Median of --reps after a warm-up, each in the same process; the
   float64 agreement of the two (gradient, relative L2) is recorded beside the times.
2. grid: the same forward + backward on uniform random images over a grid of (images, channels, size, filters),
   the measurements behind `stem_pays`, the rule for where the stem runs (metalearn/models/stem.py).
3. meta_step: the row's hybrid meta-iteration (bench_meta_step.py's) with the stem on and off (off: every
   `ConvBlock.stem` of that model answers False) and learn2learn's, alternating in one process for --rounds rounds
   after one warm-up round (the order rotates), as bench_interleaved.py does; per path the median time, the median
   over rounds of time(learn2learn) / time(path), and minor page faults per meta-iteration.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_meta_step as bench  # noqa: E402
from bench_interleaved import alternate, summarise  # noqa: E402

from metalearn._io import atomic_json  # noqa: E402
from metalearn.checkpoint import git_info  # noqa: E402
from metalearn.inner.layout import channels_last  # noqa: E402
from metalearn.models.batchnorm import channels_last_batch_norm, first_order_norms  # noqa: E402
from metalearn.models.stem import conv_norm_pool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def plain_block(x, w, b, gamma, beta):
    with first_order_norms():
        return F.max_pool2d(channels_last_batch_norm(F.conv2d(x, w, b, padding=1), gamma, beta, 1e-5), 2).relu()


def stem_block(x, w, b, gamma, beta):
    return conv_norm_pool(x, w, b, gamma, beta, 1e-5)


def real_query_images(n: int) -> torch.Tensor:
    from metalearn.config import load_config
    from metalearn.data import EpisodeSampler, open_dataset

    cfg = load_config(ROOT / "experiments" / "configs" / "omniglot_5w1s_quick.yaml")
    ds, splits = open_dataset(cfg.data)
    batch = EpisodeSampler(ds.images[splits["train"]], 5, 1, n // 5, seed=0, split="train").sample(1)
    return batch.query.x[0]


def block_times(reps: int, hidden: int = 64) -> dict:
    x64 = real_query_images(75).double()
    g = torch.Generator().manual_seed(0)
    ps64 = [torch.randn(hidden, 1, 3, 3, generator=g, dtype=torch.float64) / 3,
            torch.randn(hidden, generator=g, dtype=torch.float64) * 0.1,
            1 + 0.1 * torch.randn(hidden, generator=g, dtype=torch.float64),
            torch.randn(hidden, generator=g, dtype=torch.float64) * 0.1]
    up64 = torch.randn(75, hidden, 14, 14, generator=g, dtype=torch.float64)

    def grads(f, dtype):
        ps = [p.to(dtype).requires_grad_() for p in ps64]
        x = channels_last(x64.to(dtype))
        return torch.autograd.grad(f(x, *ps), ps, up64.to(dtype).contiguous(memory_format=torch.channels_last))

    def rel(a, b):
        return (sum(((u - v) ** 2).sum() for u, v in zip(a, b)).sqrt() / sum((v ** 2).sum() for v in b).sqrt()).item()

    out = {"images": list(x64.shape), "dtype": "float32", "float64_gradient_rel_l2_stem_vs_plain":
           rel(grads(stem_block, torch.float64), grads(plain_block, torch.float64))}
    for name, f in (("plain", plain_block), ("stem", stem_block)):
        grads(f, torch.float32)  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            grads(f, torch.float32)
            ts.append(time.perf_counter() - t0)
        out[f"{name}_ms_median"] = round(1000 * statistics.median(ts), 2)
    out["speedup"] = round(out["plain_ms_median"] / out["stem_ms_median"], 3)
    print(f"block: plain {out['plain_ms_median']} ms, stem {out['stem_ms_median']} ms ({out['speedup']}x); "
          f"float64 gradients {out['float64_gradient_rel_l2_stem_vs_plain']:.1e} apart", flush=True)
    return out


GRID = [(75, 1, 28, 64), (75, 1, 28, 32), (75, 1, 28, 16), (25, 1, 28, 32), (5, 1, 28, 64), (5, 1, 28, 32),
        (75, 3, 84, 32), (25, 3, 84, 32), (75, 3, 32, 64)]


def grid_times(reps: int) -> list:
    rows = []
    for n, c, size, width in GRID:
        g = torch.Generator().manual_seed(0)
        x = channels_last(torch.rand(n, c, size, size, generator=g))
        ps = [(torch.randn(width, c, 3, 3, generator=g) / 3).requires_grad_(), torch.zeros(width).requires_grad_(),
              torch.ones(width).requires_grad_(), torch.zeros(width).requires_grad_()]
        up = torch.randn(n, width, size // 2, size // 2, generator=g).contiguous(memory_format=torch.channels_last)
        row = {"images": n, "channels": c, "size": size, "filters": width,
               "activation_elements": n * size * size * width}
        for name, f in (("plain", plain_block), ("stem", stem_block)):
            ts = []
            for _ in range(reps + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                torch.autograd.grad(f(x, *ps), ps, up)
                ts.append(time.perf_counter() - t0)
            row[f"{name}_ms_median"] = round(1000 * statistics.median(ts[1:]), 2)
        row["speedup"] = round(row["plain_ms_median"] / row["stem_ms_median"], 3)
        rows.append(row)
        print(f"grid {n:3d} x {c} x {size}x{size}, {width:2d} filters: plain {row['plain_ms_median']:7.2f} ms, "
              f"stem {row['stem_ms_median']:7.2f} ms ({row['speedup']}x)", flush=True)
    return rows


def without_stem(model: torch.nn.Module) -> torch.nn.Module:
    """model with every `ConvBlock.stem` answering False: its first block runs the plain operations everywhere."""
    for m in model.modules():
        if hasattr(m, "stem"):
            m.stem = lambda x: False
    return model


def meta_step_rounds(row_name: str, rounds: int) -> dict:
    row, device = bench.ROWS[row_name], torch.device("cpu")
    runs = {}
    for name, path in (("hybrid", "hybrid"), ("hybrid-without-stem", "hybrid"), ("learn2learn", "learn2learn")):
        model = bench.make_model(row, device)
        if name == "hybrid-without-stem":
            without_stem(model)
        runs[name] = (bench.meta_step_fn(path, row, model), torch.optim.Adam(model.parameters(), lr=1e-3))
    batches = [bench.make_batch(row, device, seed=i) for i in range(2)]
    results = summarise(*alternate(runs, batches, device, rounds))
    for res in results:
        print(f"{res['path']:20s} {res['ms_median']:8.1f} ms  {res['speedup_vs_learn2learn_median_of_rounds']}x "
              f"learn2learn ({res['speedup_vs_learn2learn_min']}-{res['speedup_vs_learn2learn_max']})")
    return {"row": row_name, "rounds": rounds, "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", default="omniglot-5w1s-1step", choices=[r for r, v in bench.ROWS.items()
                                                                       if v.model == "conv4"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=20, help="block timings")
    ap.add_argument("--rounds", type=int, default=6, help="meta-step rounds (0: the block only)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.reps < 1 or args.rounds < 0:
        print("metalearn: error: --reps must be >= 1 and --rounds >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    record = {"command": "python " + " ".join(sys.argv), "device": "cpu", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "git": git_info(),
              "block": block_times(args.reps), "grid": grid_times(max(3, args.reps // 4))}
    if args.rounds:
        record["meta_step"] = meta_step_rounds(args.row, args.rounds)
    if args.out:
        print(f"wrote {atomic_json(record, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
