"""Episode sampling speed: metalearn's vectorised EpisodeSampler vs learn2learn's Taskset pipeline,
on the same decoded uint8 data in the same run, plus the share of one MAML meta-step that sampling takes.

    METALEARN_DATA=/work/shared/data METALEARN_CACHE=/tmp/mlcache \\
        .venv/bin/python benchmarks/bench_sampler.py [--device cpu] [--out benchmarks/results/sampler_cpu.json]

Settings: Omniglot 5-way 1-shot, 15 query, 32 tasks per meta-batch (MAML's Omniglot setting) on the
1100 MAML-split training characters; mini-ImageNet 5-way 5-shot on the real 12-images-per-class sample
(so 7 query shots, not 15), 4 tasks per meta-batch (MAML's mini-ImageNet setting).

learn2learn gets the most favourable input we can give it: a torch Dataset over the already decoded
tensor (no PIL decoding per item), MetaDataset + NWays/KShots/LoadData/RemapLabels/ConsecutiveLabels,
`Taskset.sample()` once per task; its tasks are then split into support/query and stacked into the
same (T, N*K, C, H, W) tensors ours produces, which we count as part of its pipeline.
learn2learn is imported here only (metalearn never imports it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from metalearn.algorithms.maml import MAML
from metalearn.config import DataConfig
from metalearn.data import EpisodeSampler, open_dataset
from metalearn.models.conv4 import Conv4


def timed(fn, min_seconds: float, min_reps: int = 3) -> tuple[float, int]:
    """Median-free simple mean: seconds per call over >= min_reps calls and >= min_seconds."""
    fn()  # warm-up
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    return (time.perf_counter() - start) / reps, reps


class _UInt8Dataset(torch.utils.data.Dataset):
    """(float image, label) pairs over a uint8 (classes, per_class, C, H, W) tensor, /255 per item."""

    def __init__(self, images: torch.Tensor):
        self.images, self.per_class = images, images.shape[1]

    def __len__(self):
        return self.images.shape[0] * self.per_class

    def __getitem__(self, i):
        c, s = divmod(i, self.per_class)
        return self.images[c, s].float().div_(255.0), c


def l2l_sampler(images: torch.Tensor, ways: int, shots: int, query: int, tasks: int, seed: int):
    import random

    import learn2learn as l2l

    random.seed(seed)
    dataset = l2l.data.MetaDataset(_UInt8Dataset(images))
    transforms = [l2l.data.transforms.NWays(dataset, ways), l2l.data.transforms.KShots(dataset, shots + query),
                  l2l.data.transforms.LoadData(dataset), l2l.data.transforms.RemapLabels(dataset),
                  l2l.data.transforms.ConsecutiveLabels(dataset)]
    taskset = l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=-1)

    def sample():
        sx, sy, qx, qy = [], [], [], []
        for _ in range(tasks):
            x, y = taskset.sample()                      # (N*(K+Q), C, H, W), sorted by label
            x = x.view(ways, shots + query, *x.shape[1:])
            y = y.view(ways, shots + query)
            sx.append(x[:, :shots].reshape(ways * shots, *x.shape[2:]))
            sy.append(y[:, :shots].reshape(-1))
            qx.append(x[:, shots:].reshape(ways * query, *x.shape[2:]))
            qy.append(y[:, shots:].reshape(-1))
        return torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy)

    return sample


def bench(name: str, images: torch.Tensor, ways: int, shots: int, query: int, tasks: int, device: torch.device,
          hidden: int, inner_steps: int, min_seconds: float) -> dict:
    images = images.to(device)
    ours = EpisodeSampler(images, ways, shots, query, seed=0)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def ours_step():
        ours.sample(tasks)
        sync()

    ours_s, ours_reps = timed(ours_step, min_seconds)
    l2l = l2l_sampler(images.cpu(), ways, shots, query, tasks, seed=0)
    l2l_s, l2l_reps = timed(l2l, min_seconds)

    C, H = images.shape[2], images.shape[-1]
    model = Conv4(C, ways, hidden=hidden, image_size=H).to(device)
    maml = MAML(model, inner_lr=0.4 if C == 1 else 0.01, inner_steps=inner_steps, first_order=False)
    batch = ours.sample(tasks)

    def meta_step():
        model.zero_grad(set_to_none=True)
        maml.meta_step(batch)
        sync()

    step_s, step_reps = timed(meta_step, min_seconds, min_reps=2)
    out = {
        "name": name, "images": list(images.shape), "ways": ways, "shots": shots, "query_shots": query,
        "tasks_per_batch": tasks, "support_x": list(batch.support.x.shape), "query_x": list(batch.query.x.shape),
        "ours_s_per_batch": ours_s, "ours_episodes_per_s": tasks / ours_s, "ours_reps": ours_reps,
        "learn2learn_s_per_batch": l2l_s, "learn2learn_episodes_per_s": tasks / l2l_s, "learn2learn_reps": l2l_reps,
        "speedup_vs_learn2learn": l2l_s / ours_s,
        "maml": {"model": f"conv4 hidden={hidden}", "inner_steps": inner_steps, "second_order": True},
        "meta_step_s": step_s, "meta_step_reps": step_reps,
        "sampling_fraction_of_meta_step": ours_s / (ours_s + step_s),
        "targets_met": {"speedup>=20x": l2l_s / ours_s >= 20, "sampling<=5%": ours_s / (ours_s + step_s) <= 0.05},
    }
    print(f"{name:>28}: ours {tasks / ours_s:10.1f} episodes/s | learn2learn {tasks / l2l_s:8.1f} episodes/s | "
          f"x{l2l_s / ours_s:6.1f} | meta-step {step_s * 1000:8.1f} ms, "
          f"sampling {100 * out['sampling_fraction_of_meta_step']:.2f}%")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--mini-root", default="",
                   help="mini-ImageNet CSV folder (default $METALEARN_DATA/mini-imagenet-sample)")
    p.add_argument("--out", default="")
    p.add_argument("--note", default="", help="conditions of the run, stored in the JSON (e.g. other jobs running)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import os

    results = []
    omni, splits = open_dataset(DataConfig(dataset="omniglot", split="maml"))
    results.append(bench("omniglot 5w1s q15 T=32", omni.images[splits["train"]], 5, 1, 15, 32, device,
                         hidden=64, inner_steps=1, min_seconds=args.min_seconds))
    mini_root = args.mini_root or str(Path(os.environ["METALEARN_DATA"]) / "mini-imagenet-sample")
    mini, msplits = open_dataset(DataConfig(dataset="mini-imagenet", root=mini_root, split="standard", image_size=84))
    results.append(bench("mini-imagenet 5w5s q7 T=4", mini.images[msplits["train"]], 5, 5, 7, 4, device,
                         hidden=32, inner_steps=5, min_seconds=args.min_seconds))
    import learn2learn

    report = {
        "command": " ".join(["python"] + sys.argv),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
        "note": args.note,
        "torch": torch.__version__, "learn2learn": learn2learn.__version__, "python": platform.python_version(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
