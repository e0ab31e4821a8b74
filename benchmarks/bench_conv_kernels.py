"""Single-convolution throughput on this CPU: PyTorch's oneDNN (mkldnn) kernels against its
im2col + GEMM fallback (mkldnn disabled), NCHW and channels-last, forward and backward (input and
weight gradients), at ResNet-12's and conv4's layer shapes.

    .venv/bin/python benchmarks/bench_conv_kernels.py --threads 1 --out benchmarks/results/conv_kernels_cpu.json

Why it exists: a ResNet-12 meta-step on this CPU spends about 85% of its time in convolution
kernels (benchmarks/profile_meta_step.py), kernels that metalearn and learn2learn call alike; this
measures how fast those kernels are and whether another kernel choice would be faster. 3x3
convolutions, stride 1, padding 1; GF/s counts 2 * N * Cout * Cin * 9 * H * W flops forward and
twice that backward; each number is the mean of 3 calls after 2 warm-up calls.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metalearn._io import atomic_json  # noqa: E402

SHAPES = [  # (batch, in channels, out channels, height = width)
    (25, 3, 64, 84), (25, 64, 64, 84), (25, 64, 160, 42), (25, 160, 160, 42), (25, 160, 320, 21),
    (25, 320, 320, 21), (25, 320, 640, 10), (25, 640, 640, 10), (5, 64, 64, 84), (5, 640, 640, 10),
    (75, 64, 64, 14),
]


def measure(n: int, cin: int, cout: int, hw: int, channels_last: bool, mkldnn: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, cin, hw, hw, generator=g).to(memory_format=fmt).requires_grad_()
    w = torch.randn(cout, cin, 3, 3, generator=g).to(memory_format=fmt).requires_grad_()
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        for _ in range(2):
            y = F.conv2d(x, w, padding=1)
            torch.autograd.grad(y, (x, w), torch.ones_like(y))
        gy = torch.randn(y.shape, generator=g).to(memory_format=fmt)
        t = time.perf_counter()
        for _ in range(3):
            y = F.conv2d(x, w, padding=1)
        fwd = (time.perf_counter() - t) / 3
        t = time.perf_counter()
        for _ in range(3):
            torch.autograd.grad(y, (x, w), gy, retain_graph=True)
        bwd = (time.perf_counter() - t) / 3
    gflop = 2 * n * cout * cin * 9 * hw * hw / 1e9
    return {"forward_ms": round(fwd * 1e3, 2), "backward_ms": round(bwd * 1e3, 2),
            "forward_gflops": round(gflop / fwd, 1), "backward_gflops": round(2 * gflop / bwd, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n, cin, cout, hw in SHAPES:
        for cl in (False, True):
            for mk in (True, False):
                r = {"batch": n, "cin": cin, "cout": cout, "size": hw, "channels_last": cl, "mkldnn": mk,
                     **measure(n, cin, cout, hw, cl, mk)}
                rows.append(r)
                print(f"N={n:3d} {cin:3d}->{cout:3d} {hw:2d}x{hw:<2d} {'NHWC' if cl else 'NCHW'} "
                      f"{'oneDNN' if mk else 'im2col'} forward {r['forward_ms']:8.1f} ms {r['forward_gflops']:6.1f} "
                      f"GF/s  backward {r['backward_ms']:8.1f} ms {r['backward_gflops']:6.1f} GF/s", flush=True)
    if args.out:
        atomic_json({"command": "python " + " ".join(sys.argv), "threads": args.threads, "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine(), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
