"""float32 against float64 for the ResNet-12 5-step row's noise batch: is a float32 disagreement between
hybrid and the loop (bench_meta_step.py --check float32) a fault of the path or of the problem?

    .venv/bin/python benchmarks/check_float32_resnet12.py 16,32,64,128

Prints the global relative L2 error (over all parameters) and the max-abs relative error of the loop's
and hybrid's float32 meta-gradients against the loop's float64 one, then hybrid's float64 distance to it,
then the problem's own sensitivity: how far the float64 meta-gradient moves when every weight is
multiplied by (1 + 1e-7 z), z ~ N(0, 1) (three draws; 1e-7 is float32's rounding). A float32 error
inside that spread is the problem's conditioning (five steps through max-pool and LeakyReLU kinks),
not a fault of the path.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_meta_step as bench  # noqa: E402

from metalearn.models import ResNet12  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    width = [int(c) for c in sys.argv[1].split(",")] if len(sys.argv) > 1 else [64, 160, 320, 640]
    row = bench.ROWS["resnet12-5w1s-5step"]
    batch = bench.make_batch(row, torch.device("cpu"), seed=123)  # the agreement check's batch

    def grads(dtype: torch.dtype, path: str, perturb: int = -1) -> torch.Tensor:
        torch.manual_seed(0)
        model = ResNet12(3, 5, image_size=84, channels=width).to(dtype)
        if perturb >= 0:  # every weight times (1 + 1e-7 z)
            gen = torch.Generator().manual_seed(perturb)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=gen, dtype=dtype))
        bench.meta_step_fn(path, row, model)(bench.cast_batch(batch, dtype))  # the benchmark's own meta-step
        return torch.cat([p.grad.flatten().double() for p in model.parameters()])

    ref = grads(torch.float64, "loop")
    for path in ("loop", "hybrid"):
        g = grads(torch.float32, path)
        l2, mx = (g - ref).norm() / ref.norm(), (g - ref).abs().max() / ref.abs().max()
        print(f"widths {width} {path:6s} float32 vs loop float64: global relative L2 {l2:.3e}, "
              f"max-abs relative {mx:.3e}", flush=True)
    g = grads(torch.float64, "hybrid")
    print(f"widths {width} hybrid float64 vs loop float64: global relative L2 {((g - ref).norm() / ref.norm()):.3e}")
    for seed in range(3):
        g = grads(torch.float64, "loop", perturb=seed)
        print(f"widths {width} loop float64, weights x (1 + 1e-7 z) draw {seed}: global relative L2 "
              f"{((g - ref).norm() / ref.norm()):.3e} from the unperturbed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
