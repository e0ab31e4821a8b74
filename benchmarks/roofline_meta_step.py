"""How fast could a meta-step be on this CPU? Floating-point work against the core's measured ceiling.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/roofline_meta_step.py --row resnet12-5w1s-1step \\
        --paths hybrid,learn2learn --threads 1 --out benchmarks/results/roofline_resnet12_1step_cpu.json

Why it exists: issue 15 asks for 1.5x over learn2learn on the ResNet-12 rows of bench_meta_step.py.
profile_meta_step.py showed that ~85% of a ResNet-12 meta-step is oneDNN convolution kernels, which
learn2learn calls exactly as we do. This script turns that into a bound. For each path it measures

- flops: the floating-point operations of one meta_step, counted by torch.utils.flop_counter
  (convolutions forward and backward, matrix products; elementwise ops are not counted, so
  this undercounts, which only makes the bound below looser);
- conv_flops and conv_s: the convolution part of those, and the self time of the convolution
  kernels under torch.profiler in a separate meta_step (so conv_gflops is what the kernels reached);
- wall_s: one untimed warm-up, then the median of --reps meta_steps without the profiler.

The ceiling is the best throughput this core reached on dense work in the same process: float32
matrix products (2048x2048) and every distinct convolution of the row's model at the row's batch
sizes (forward, channels-last and contiguous), whichever is highest. The bound is then

    fastest_possible_s = conv_flops(path) / ceiling           (every convolution at the ceiling,
                                                               everything else free)
    max_speedup_vs(learn2learn) = wall_s(learn2learn) / fastest_possible_s(path)

A path that does the same floating-point work as learn2learn cannot beat it by more than that factor
on this core, whatever the execution strategy; only an algorithm with fewer multiplications
(Winograd, FFT convolutions) could, and those round differently from oneDNN's direct convolution.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_meta_step as bench  # noqa: E402
from profile_meta_step import CONV_BACKWARD, CONV_FORWARD, op_seconds, row_parser  # noqa: E402

from metalearn._io import atomic_json  # noqa: E402
from metalearn.checkpoint import git_info  # noqa: E402

CONV_COUNTED = ("convolution", "_convolution", "convolution_backward", "convolution_overrideable",
                "convolution_backward_overrideable", "cudnn_convolution", "mkldnn_convolution")


_TORCH_CONV_BACKWARD_FLOP = getattr(flop_counter.conv_backward_flop, "__wrapped__", flop_counter.conv_backward_flop)


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's formula for convolution_backward, with the weight gradient of a grouped convolution
    divided by its groups (torch 2.14's counts it as if ungrouped, which is what the batched paths
    run: per-task weights as groups)."""
    def part(mask):
        return _TORCH_CONV_BACKWARD_FLOP(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation,
                                         transposed, output_padding, groups, mask, out_shape=out_shape)
    return part([output_mask[0], False, False]) + part([False, output_mask[1], False]) // groups


def count_flops(fn, batch) -> tuple[int, int]:
    """(all counted flops, convolution flops) of fn(batch)."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}) \
            as counter:
        fn(batch)
    per_op = counter.get_flop_counts().get("Global", {})
    total = sum(per_op.values())
    conv = sum(v for op, v in per_op.items() if str(op).split(".")[1] in CONV_COUNTED)
    return int(total), int(conv)


def conv_seconds(fn, batch, device: torch.device) -> float:
    """Self time of the convolution kernels in one fn(batch), under torch.profiler."""
    return sum(s for op, s in op_seconds(fn, batch, device)[0].items() if op in CONV_FORWARD + CONV_BACKWARD)


def measure_path(row: bench.Row, path: str, device: torch.device, reps: int) -> dict:
    model = bench.make_model(row, device)
    fn = bench.meta_step_fn(path, row, model)
    batch = bench.make_batch(row, device, seed=0)
    fn(batch)  # warm-up
    walls = []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn(batch)
        bench.sync(device)
        walls.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    conv_s = conv_seconds(fn, batch, device)
    model.zero_grad(set_to_none=True)
    flops, conv_flops = count_flops(fn, batch)
    wall = statistics.median(walls)
    return {"path": path, "wall_s": round(wall, 3), "walls_s": [round(w, 3) for w in walls],
            "flops": flops, "conv_flops": conv_flops, "conv_s": round(conv_s, 3),
            "gflops": round(flops / wall / 1e9, 2), "conv_gflops": round(conv_flops / conv_s / 1e9, 2)}


def _best_rate(fn, flops: int, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def ceiling(row: bench.Row, device: torch.device) -> dict:
    """Best GFLOP/s this core reaches on float32 matrix products and on the row's own convolutions."""
    rates = {}
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    rates["matmul_2048"] = _best_rate(lambda: a @ b, 2 * 2048**3)
    shapes, hooks = set(), []
    model = bench.make_model(row, device)

    def record(mod, inputs, _out):
        x = inputs[0]
        shapes.add((tuple(x.shape[1:]), tuple(mod.weight.shape), mod.stride, mod.padding))

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(record))
    with torch.no_grad():
        model(bench.make_batch(row, device, seed=0).support.x[0])
    for h in hooks:
        h.remove()
    sizes = sorted({row.ways * row.shots, row.ways * row.query})
    for (in_shape, w_shape, stride, padding) in sorted(shapes):
        w = torch.randn(w_shape, device=device)
        for n in sizes:
            x = torch.randn(n, *in_shape, device=device)
            out = F.conv2d(x, w, stride=stride, padding=padding)
            flops = 2 * out.numel() * w_shape[1] * w_shape[2] * w_shape[3]
            for layout, xx in (("contiguous", x), ("channels_last", x.contiguous(memory_format=torch.channels_last))):
                key = f"conv {w_shape[1]}->{w_shape[0]} k{w_shape[2]} at {in_shape[1]}x{in_shape[2]}, n={n}, {layout}"
                rates[key] = _best_rate(lambda: F.conv2d(xx, w, stride=stride, padding=padding), flops)
    return {k: round(v, 2) for k, v in rates.items()}


def main() -> int:
    ap = row_parser(__doc__)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row, device = bench.ROWS[args.row], torch.device(args.device)
    if row.model == "mlp":
        print(f"metalearn: error: --row {row.name}: the MLP has no convolutions, and this bound counts only "
              "convolutions", file=sys.stderr)
        return 2
    rates = ceiling(row, device)
    top = max(rates.values())
    print(f"ceiling: {top:.1f} GFLOP/s ({max(rates, key=rates.get)}); matmul 2048: {rates['matmul_2048']:.1f}",
          flush=True)
    results = []
    for path in args.paths.split(","):
        if not bench.available(path, row):
            print(f"{path}: skipped (not installed)")
            continue
        r = measure_path(row, path, device, args.reps)
        r["fastest_possible_s"] = round(r["conv_flops"] / (top * 1e9), 3)
        results.append(r)
        print(f"{row.name:22s} {path:12s} {r['wall_s']:8.2f} s  {r['flops'] / 1e12:.3f} TFLOP "
              f"(convolutions {r['conv_flops'] / 1e12:.3f}) at {r['gflops']:.1f} GFLOP/s; convolution kernels "
              f"{r['conv_s']:.2f} s at {r['conv_gflops']:.1f} GFLOP/s; "
              f"fastest possible {r['fastest_possible_s']:.2f} s",
              flush=True)
    ref = next((r for r in results if r["path"] == "learn2learn"), None)
    if ref is not None:
        for r in results:
            r["max_speedup_vs_learn2learn"] = round(ref["wall_s"] / r["fastest_possible_s"], 3)
            print(f"{r['path']:12s} at most {r['max_speedup_vs_learn2learn']:.2f}x learn2learn on this core "
                  f"(every convolution at {top:.1f} GFLOP/s, nothing else costing time)")
    if args.out:
        atomic_json({"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv), "row": row.name,
                     "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine(), "git": git_info(),
                     "ceiling_gflops": round(top, 2), "rates_gflops": rates, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
