"""Why float32 meta-gradients after several inner steps through max-pooling are not a property of the path.

    .venv/bin/python benchmarks/check_float32_ties.py        (real Omniglot: METALEARN_DATA must hold omniglot/)

Takes the small ResNet-12 of tests/test_float32_real.py (widths 8-16-16-32, 28x28), one real 4-task 5-way
1-shot Omniglot batch, and the weights after one batched float32 inner step (lr 0.01). At exactly those weights
(cast to float64 without rounding) it computes each task's support gradient, the second inner step, three
ways: float64 (the reference), float32 one task at a time (the loop's kernels) and float32 under vmap (the
batched path's grouped convolutions). It prints the global relative L2 error of both, then, for the task
where the loop is worst, the relative error of the gradient flowing into each layer's output (backward hooks)
so one can see where float32 leaves float64.

What it showed (2026-11-30, results/float32_ties_cpu.txt): the loop's float32 gradient was 1.1e-3 from
float64 and vmap's 2.2e-6. In the loop's worst task the error jumps at block 0's max-pool: 7.8e-7 in the
gradient after it, 1.3e-2 before it. 2696 of that pool's 7840 windows hold an exact tie in float64
(Omniglot's flat background), and float32 picked a different element in 7 of them: rounding in the layers
below breaks a tie one way or the other, and the window's gradient moves to another element. Either is a
valid subgradient; no kernel is at fault, and at other weights it can be vmap's rounding that flips one.
tests/test_float32_real.py therefore checks several-step float32 accuracy on a smooth model and one-step
accuracy on conv4 and ResNet-12.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalearn.algorithms import ALGORITHMS  # noqa: E402
from metalearn.data import EpisodeSampler, Omniglot  # noqa: E402
from metalearn.data.splits import omniglot_maml_split  # noqa: E402
from metalearn.engine import Engine  # noqa: E402
from metalearn.inner.batched import task_vmap  # noqa: E402
from metalearn.inner.loop import forward  # noqa: E402
from metalearn.models import ResNet12  # noqa: E402

T = 4


def small_resnet12(dtype: torch.dtype) -> ResNet12:
    torch.manual_seed(0)
    return ResNet12(in_channels=1, num_classes=5, image_size=28, channels=[8, 16, 16, 32]).to(dtype)


def main() -> int:
    torch.set_num_threads(1)
    root = Path(os.environ.get("METALEARN_DATA", "../shared/data"))
    omniglot = Omniglot(root / "omniglot", cache_dir=os.environ.get("METALEARN_CACHE"))
    images = omniglot.images[omniglot_maml_split()["train"]]
    batch = EpisodeSampler(images, 5, 1, 5, seed=0, split="train", dtype=torch.float32).sample(T)
    x, y = batch.support.x, batch.support.y

    model = small_resnet12(torch.float32)
    algo = ALGORITHMS["maml"](model, inner_lr=0.01, inner_steps=1)
    params = {n: p.detach().requires_grad_() for n, p in algo.params().items()}
    step1 = Engine(algo, "loop")._adapt_tasks(params, batch, slice(0, T), steps=1, lr=None, first_order=True,
                                              twin=False)
    weights = {n: step1[n].detach().double() for n in params}  # (T, *shape), exactly the float32 values

    def support_grads(dtype: torch.dtype, how: str) -> "dict[str, torch.Tensor]":
        net = small_resnet12(dtype)
        P = {n: w.to(dtype).requires_grad_() for n, w in weights.items()}
        xs = x.to(dtype)
        if how == "loop":
            loss = sum(F.cross_entropy(forward(net, {n: w[t] for n, w in P.items()}, xs[t]), y[t]) for t in range(T))
        else:
            out = task_vmap(lambda p, xx: forward(net, p, xx), set(P))(P, xs)
            loss = F.cross_entropy(out.reshape(-1, 5), y.reshape(-1), reduction="none").view(T, -1).mean(1).sum()
        return dict(zip(P, (g.double() for g in torch.autograd.grad(loss, list(P.values())))))

    def rel(a: "dict[str, torch.Tensor]", b: "dict[str, torch.Tensor]", t: "int | None" = None) -> float:
        keys = [n for n in b if not n.endswith("conv.bias")]
        pick = (lambda v: v) if t is None else (lambda v: v[t])
        num = sum(((pick(a[n]) - pick(b[n])) ** 2).sum() for n in keys).sqrt()
        return (num / sum((pick(b[n]) ** 2).sum() for n in keys).sqrt()).item()

    ref = support_grads(torch.float64, "loop")
    print(f"float64 vmap vs loop: {rel(support_grads(torch.float64, 'vmap'), ref):.2e}")
    loop = support_grads(torch.float32, "loop")
    print(f"float32 loop vs float64: {rel(loop, ref):.2e}")
    print(f"float32 vmap vs float64: {rel(support_grads(torch.float32, 'vmap'), ref):.2e}")

    worst = max(range(T), key=lambda t: rel(loop, ref, t))
    print(f"task {worst} (the loop's worst): gradient reaching each layer's output, float32 vs float64")
    grads, pre_pool = {}, {}
    for dtype in (torch.float64, torch.float32):
        net = small_resnet12(dtype)
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(weights[n][worst])
        rec = grads[dtype] = {}
        def keep(name: str):
            def hook(module, inputs, out) -> None:
                out.register_hook(lambda g: rec.__setitem__(name, g.double()))
            return hook

        for name, m in net.named_modules():
            if name and not list(m.children()):
                m.register_forward_hook(keep(name))
        block0 = net.features[0]
        outs = {}
        block0.norm3.register_forward_hook(lambda m, i, o: outs.__setitem__("main", o.detach().double()))
        block0.shortcut.register_forward_hook(lambda m, i, o: outs.__setitem__("short", o.detach().double()))
        F.cross_entropy(net(x[worst].to(dtype)), y[worst]).backward()
        pre_pool[dtype] = outs["main"] + outs["short"]  # what block 0 max-pools
    for name, g in grads[torch.float64].items():
        if g.norm() > 0:
            print(f"  {name:30s} {((grads[torch.float32][name] - g).norm() / g.norm()).item():.1e}")
    windows = {d: h.unfold(2, 2, 2).unfold(3, 2, 2).reshape(*h.shape[:2], -1, 4) for d, h in pre_pool.items()}
    top2 = windows[torch.float64].topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).abs()
    flipped = windows[torch.float64].argmax(-1) != windows[torch.float32].argmax(-1)
    print(f"block 0's max-pool windows: {gap.numel()}; exact ties in float64: {int((gap == 0).sum())}; "
          f"ties within 1e-5: {int((gap <= 1e-5).sum())}; windows whose argmax float32 picks differently: "
          f"{int(flipped.sum())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
