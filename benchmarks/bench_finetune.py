"""Fine-tuning evaluation speed: the batched path (episodes as a batch dimension, frozen blocks run
once per batch) against the per-episode reference loop (metalearn/algorithms/finetune.py).

    python benchmarks/bench_finetune.py [--episodes 100] [--steps 50] [--hidden 32] [--repeat 2] \
        [--out benchmarks/results/finetune_cpu.json]

Random conv4 weights and random uint8 28x28 images (the timing does not depend on the values);
5-way 1-shot, 15 queries, SGD, batches of 50 episodes. Both paths give the same accuracies
(checked here, and to 1e-10 on the logits in tests/test_transfer.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from metalearn.algorithms.finetune import FineTune
from metalearn.evaluation import evaluate
from metalearn.models import Conv4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="time each path this many times, keep the fastest")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (100, 20, 1, 28, 28), dtype=torch.uint8)
    model = Conv4(1, 64, hidden=args.hidden)
    rows = []
    for blocks, lora in [(0, 0), (2, 0), (4, 0), (4, 4)]:
        accs, row = {}, {"blocks": blocks, "lora_rank": lora}
        for execution in ("batched", "loop"):
            ft = FineTune(model, inner_lr=0.1, inner_steps=args.steps, blocks=blocks, lora_rank=lora,
                          execution=execution)
            times = []
            for _ in range(args.repeat):  # the fastest of `repeat` runs: a shared machine only ever adds time
                t0 = time.perf_counter()
                res = evaluate(ft, images, ways=5, shots=1, query_shots=15, episodes=args.episodes, seed=0,
                               inner_steps=args.steps, inner_lr=0.1, batch_size=50)
                times.append(time.perf_counter() - t0)
            row[f"{execution}_s"] = round(min(times), 3)
            accs[execution] = res.accuracies
        row["speedup"] = round(row["loop_s"] / row["batched_s"], 2)
        row["max_accuracy_difference"] = max(abs(a - b) for a, b in zip(accs["batched"], accs["loop"]))
        rows.append(row)
        print(row, flush=True)
    result = {"command": "python benchmarks/bench_finetune.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v),
              "device": f"cpu ({platform.processor() or platform.machine()})", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "episodes": args.episodes, "steps": args.steps, "hidden": args.hidden,
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
