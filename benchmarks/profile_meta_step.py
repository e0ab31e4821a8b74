"""Where a meta-iteration's time goes: one meta_step of a bench_meta_step.py row and path under
torch.profiler, its self time split into convolution kernels (forward and backward) and the rest.

    .venv/bin/python benchmarks/profile_meta_step.py --row resnet12-5w1s-1step --paths hybrid,learn2learn \\
        --threads 1 --out benchmarks/results/profile_resnet12_cpu.json

Why it exists: on this CPU the ResNet-12 row is bound by convolution kernels (oneDNN's, which
every library calls alike), so no execution strategy (batching tasks, vmap, fewer Python ops) can
make it much faster than learn2learn; this script measures that share instead of asserting it.
Each path runs one warm-up meta_step and then one profiled meta_step on the row's noise batch
(the same data and weights as bench_meta_step.py).

--timer dispatch (CPU only) times each operator itself, under a TorchDispatchMode, and keys it by its input
shapes and layouts (cl: channels-last, s: other strides). On this 2-core VM torch.profiler stretched a
2.7 s hybrid step of row 1 to 5.2 s and charged 1.14 s to aten::mul
(benchmarks/results/profile_row1_xeon_cpu.json); under the dispatch timer the step took 4.0 s, 3.0 s of it
inside operators, 0.26 s in multiplications (benchmarks/results/op_times_row1_xeon_cpu.json).

    .venv/bin/python benchmarks/profile_meta_step.py --row omniglot-5w1s-1step --paths hybrid,learn2learn --threads 1 \\
        --timer dispatch --out benchmarks/results/op_times_row1_xeon_cpu.json
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_meta_step as bench  # noqa: E402

from metalearn._io import atomic_json  # noqa: E402
from metalearn.checkpoint import git_info  # noqa: E402

CONV_FORWARD = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::slow_conv_transpose2d",
                "aten::cudnn_convolution", "aten::_nnpack_spatial_convolution", "aten::slow_conv_dilated2d",
                "aten::thnn_conv2d", "aten::cudnn_convolution_transpose")
CONV_BACKWARD = ("aten::convolution_backward", "aten::_slow_conv2d_backward", "aten::mkldnn_convolution_backward")
DISPATCH_CONV_FORWARD, DISPATCH_CONV_BACKWARD = "aten.convolution.", "aten.convolution_backward."


def op_seconds(fn, batch, device: torch.device) -> "tuple[dict[str, float], float]":
    """(self time in seconds of every operator, wall seconds) of one fn(batch) under torch.profiler; the wall
    time covers the profiled call only, not the profiler's bookkeeping after it."""
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(batch)
        bench.sync(device)
    wall = time.perf_counter() - t0
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}, wall


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return str(tuple(t.shape))
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return f"{tuple(t.shape)}cl"
    return f"{tuple(t.shape)}s{t.stride()}"


class _OpTimer(TorchDispatchMode):
    """Wall time of every operator call, keyed by operator and input shapes. Each call is timed alone (the
    mode is off inside it), so nested operators are not counted twice. CPU only: CUDA calls are asynchronous."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: "dict[str, float]" = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        key = f"{func} " + " ".join(_layout(a) for a in args if isinstance(a, torch.Tensor))
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
        return out


def op_seconds_dispatch(fn, batch) -> "tuple[dict[str, float], float]":
    """(seconds of every operator by shapes, wall seconds) of one fn(batch), timed by `_OpTimer`."""
    timer = _OpTimer()
    t0 = time.perf_counter()
    with timer:
        fn(batch)
    return timer.seconds, time.perf_counter() - t0


def row_parser(doc: str) -> argparse.ArgumentParser:
    """The options this script and roofline_meta_step.py share: --row, --paths, --device, --threads, --out."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--row", default="resnet12-5w1s-1step", choices=list(bench.ROWS))
    ap.add_argument("--paths", default="hybrid,learn2learn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    return ap


def profile_path(row: bench.Row, path: str, device: torch.device, timer: str = "profiler") -> dict:
    model = bench.make_model(row, device)
    fn = bench.meta_step_fn(path, row, model)
    batch = bench.make_batch(row, device, seed=0)
    fn(batch)  # warm-up
    model.zero_grad(set_to_none=True)
    if timer == "dispatch":
        ops, wall = op_seconds_dispatch(fn, batch)
        fwd = sum(v for k, v in ops.items() if k.startswith(DISPATCH_CONV_FORWARD))
        bwd = sum(v for k, v in ops.items() if k.startswith(DISPATCH_CONV_BACKWARD))
    else:
        ops, wall = op_seconds(fn, batch, device)
        fwd = sum(v for k, v in ops.items() if k in CONV_FORWARD)
        bwd = sum(v for k, v in ops.items() if k in CONV_BACKWARD)
    total = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12 if timer == "profiler" else 30]
    extra = {}
    if timer == "dispatch":  # also by operator alone, comparable with torch.profiler's keys
        by_op: "dict[str, float]" = {}
        for k, v in ops.items():
            by_op[k.split(" ")[0]] = by_op.get(k.split(" ")[0], 0.0) + v
        extra["by_operator_s"] = {k: round(v, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]}
    return {**extra, "path": path, "timer": timer, "wall_s": round(wall, 3), "profiled_self_s": round(total, 3),
            "conv_forward_s": round(fwd, 3), "conv_backward_s": round(bwd, 3),
            "conv_share": round((fwd + bwd) / total, 4), "conv_share_of_wall": round((fwd + bwd) / wall, 4),
            "top_ops_self_s": {k: round(v, 3) for k, v in top}}


def main() -> int:
    ap = row_parser(__doc__)
    ap.add_argument("--timer", choices=["profiler", "dispatch"], default="profiler",
                    help="torch.profiler's self times, or each operator timed alone (CPU only)")
    args = ap.parse_args()
    if args.timer == "dispatch" and torch.device(args.device).type != "cpu":
        ap.error("--timer dispatch times CPU operators only (CUDA calls return before they finish)")
    if args.threads:
        torch.set_num_threads(args.threads)
    row, device = bench.ROWS[args.row], torch.device(args.device)
    results = []
    for path in args.paths.split(","):
        if not bench.available(path, row):
            print(f"{path}: skipped (not installed)")
            continue
        r = profile_path(row, path, device, args.timer)
        results.append(r)
        print(f"{row.name:22s} {path:14s} {r['wall_s']:8.2f} s   convolution kernels {100 * r['conv_share']:5.1f}% "
              f"(forward {r['conv_forward_s']:.2f} s, backward {r['conv_backward_s']:.2f} s)", flush=True)
    if args.out:
        atomic_json({"command": "python " + " ".join(sys.argv), "row": row.name, "device": str(device),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "cpu": platform.processor() or platform.machine(), "git": git_info(),
                               "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
