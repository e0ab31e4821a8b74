"""metalearn command line.

    metalearn train CONFIG.yaml [key=value ...]     meta-train, then evaluate on fixed test episodes
    metalearn eval CHECKPOINT [--split test --episodes 600 --ways 5 --shots 1 ...]
    metalearn list                                    data sets, models, algorithms, presets
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .errors import MetalearnError


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    ev = summary["eval"]
    print(f"run folder: {summary['run_dir']}")
    print(f"meta-training took {summary['train_seconds']:.1f} s")
    print(f"{ev['split']} accuracy: {100 * ev['mean']:.2f} ± {100 * ev['ci95']:.2f}% (95% CI) over {ev['episodes']} "
          f"{ev['ways']}-way {ev['shots']}-shot episodes, {ev['inner_steps']} inner steps")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ._io import atomic_json
    from .checkpoint import load_checkpoint
    from .config import from_dict, validate
    from .data import check_episode_fits, open_dataset
    from .evaluation import evaluate
    from .models import build_model
    from .train import build_algorithm, eval_settings, resolve_device

    ckpt = load_checkpoint(args.checkpoint)
    cfg = from_dict(ckpt["config"])
    for key, value in [("split", args.split), ("episodes", args.episodes), ("ways", args.ways), ("shots", args.shots),
                       ("query_shots", args.query_shots), ("inner_steps", args.inner_steps),
                       ("inner_lr", args.inner_lr), ("seed", args.seed), ("batch_size", args.batch_size)]:
        if value is not None:
            setattr(cfg.eval, key, value)
    if args.device:
        cfg.device = args.device
    validate(cfg)
    ev = eval_settings(cfg)
    if ev["ways"] != cfg.data.ways:
        raise MetalearnError(f"--ways {ev['ways']}: this checkpoint's head has {cfg.data.ways} outputs")
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
    ds, splits = open_dataset(cfg.data)
    check_episode_fits(cfg.eval.split, len(splits[cfg.eval.split]), ds.samples_per_class, ev["ways"], ev["shots"], ev["query_shots"])
    model = build_model(cfg.model, ds.channels, cfg.data.ways, cfg.data.image_size).to(device=device, dtype=dtype)
    model.load_state_dict(ckpt["model"])
    algorithm = build_algorithm(cfg, model)
    images = ds.images.to(device)[splits[cfg.eval.split].to(device)]
    result = evaluate(algorithm, images, ways=ev["ways"], shots=ev["shots"], query_shots=ev["query_shots"],
                      episodes=cfg.eval.episodes, seed=cfg.eval.seed, inner_steps=ev["inner_steps"],
                      inner_lr=ev["inner_lr"], batch_size=cfg.eval.batch_size, split=cfg.eval.split,
                      batchnorm=cfg.model.batchnorm, dtype=dtype, progress=not args.no_progress)
    print(result.summary())
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(
        f"eval-{result.split}-{result.ways}w{result.shots}s-{result.episodes}ep.json")
    atomic_json({"checkpoint": str(args.checkpoint), "eval": result.to_dict()}, out)
    print(f"saved {out}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .algorithms import ALGORITHMS
    from .data import DATASETS, SPLITS
    from .models import MODELS

    print("data sets:  " + ", ".join(f"{d} (splits: {', '.join(SPLITS[d])})" for d in sorted(DATASETS)))
    print("models:     " + ", ".join(sorted(MODELS)))
    print("algorithms: " + ", ".join(sorted(ALGORITHMS)))
    presets = sorted(Path("experiments/configs").glob("*.yaml"))
    print("presets:    " + (", ".join(str(p) for p in presets) if presets else "(run from the repository root to see experiments/configs)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metalearn", description="Few-shot meta-learning: train, evaluate, list.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a YAML config, then evaluate on fixed test episodes",
                       description="Meta-train from a YAML preset plus key=value overrides (e.g. outer.iterations=100 "
                                   "inner.adapt=[head.*]). Unknown keys are errors. Writes config.yaml, metrics.jsonl, "
                                   "checkpoint.pt and eval-<split>.json into tracking.out_dir/tracking.name.")
    t.add_argument("config", help="YAML preset, e.g. experiments/configs/omniglot_5w1s_quick.yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied after the preset")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on fixed episodes; prints and saves mean ± 95%% CI")
    e.add_argument("checkpoint")
    e.add_argument("--split", choices=["train", "val", "test"], help="class split (default: the run's eval.split)")
    e.add_argument("--episodes", type=int, help="number of fixed episodes (default: the run's eval.episodes)")
    e.add_argument("--ways", type=int, help="N (must match the checkpoint's head)")
    e.add_argument("--shots", type=int, help="K support examples per class")
    e.add_argument("--query-shots", type=int, help="query examples per class")
    e.add_argument("--inner-steps", type=int, help="test-time inner steps")
    e.add_argument("--inner-lr", type=float, help="test-time inner lr")
    e.add_argument("--seed", type=int, help="seed of the fixed episode list")
    e.add_argument("--batch-size", type=int, help="episodes adapted together (memory only)")
    e.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    e.add_argument("--out", help="where to write the JSON result")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)

    ls = sub.add_parser("list", help="show data sets, models, algorithms and presets")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MetalearnError as e:
        print(f"metalearn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalearn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
