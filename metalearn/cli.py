"""metalearn command line.

    metalearn train CONFIG.yaml [key=value ...] [--resume]   meta-train, then evaluate on fixed test episodes
    metalearn pretrain CONFIG.yaml [key=value ...]           supervised pre-training, then fine-tuning per episode
    metalearn eval CHECKPOINT [--split test --episodes 600 ...] [eval.KEY=VALUE ...]  one result file per setting
    metalearn ablate ABLATION.yaml [--seeds 3]                run a grid of configs; table + figure of mean ± CI
    metalearn bench CONFIG.yaml [key=value ...] [--steps 20]  time meta-training steps on synthetic images
    metalearn list                                            data sets, models, algorithms, presets, ablations
    metalearn data check [DATASET] [key=value ...]            check a data set's splits; classes, images, overlaps
    metalearn --version                                       metalearn (its commit in a checkout) and torch versions
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

from .errors import MetalearnError


def _cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .algorithms.registry import capabilities
    from .train import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # `metalearn train key=value ...`: defaults only
    if config is None and not overrides:
        raise MetalearnError("train needs a preset YAML (see `metalearn list`), a run folder, or key=value overrides")
    from .ablate import split_multirun

    plain, vary = split_multirun(overrides)
    if vary or args.seeds is not None:  # a multirun: the grid of comma-separated values x seeds, run as an ablation
        if args.resume:
            raise MetalearnError("--resume continues one run; re-run the same multirun command to continue a grid")
        return _multirun(config, plain, vary, args, " ".join([config or "", *overrides]).strip())
    config, cfg = _load_run_config(config, overrides, args.resume)
    if distributed.launched_by_torchrun():  # torchrun: refuse what cannot be split before joining the job
        distributed.check_algorithm(cfg.outer.algorithm, distributed.Context(world_size=2))
    if not capabilities(cfg.outer.algorithm).meta_trained:  # transfer baseline: pre-train (or load), then fine-tune
        return _run_transfer(cfg, args.resume)
    dist = distributed.init(cfg.device)  # no-op without torchrun
    try:
        summary = train(cfg, resume=args.resume)
    finally:
        distributed.shutdown()
    if not dist.is_main:
        return 130 if summary["interrupted"] == "SIGINT" else 143 if summary["interrupted"] else 0
    if summary.get("finished"):
        return _print_finished(summary, "train")
    print(f"run folder: {summary['run_dir']}")
    if summary["interrupted"]:
        return _interrupted(summary, f"metalearn train {summary['run_dir']} --resume")
    ev = summary["eval"]
    print(f"meta-training took {summary['train_seconds']:.1f} s")
    print(final_line(ev))
    return 0


def _multirun(config: Optional[str], overrides: List[str], vary: dict, args: argparse.Namespace, command: str) -> int:
    """`metalearn train PRESET inner.lr=0.1,0.4 inner.steps=1,5 --seeds 3`: every combination, every seed,
    aggregated as `metalearn ablate` does (same folders, reuse rules, table and figure)."""
    from .ablate import build_ablation, run_ablation
    from .presets import resolve

    path = resolve(config, "configs") if config else None
    stem = path.stem if path else "defaults"
    name = "-".join([stem, *(k.split(".")[-1] for k in vary)]) if vary else f"{stem}-seeds"
    ablation = build_ablation(name, f"metalearn train {command}", path or Path("."), path, overrides,
                              vary, seeds=args.seeds or 1, out_dir=args.out, where="multirun")
    runs = sum(len(c.configs) for c in ablation.cells)
    print(f"multirun {ablation.name}: {len(ablation.cells)} cells x {args.seeds or 1} seeds = {runs} runs -> "
          f"{Path(args.out) / ablation.name}")
    report = run_ablation(ablation, progress=True)
    print((Path(report["out_dir"]) / "table.md").read_text())
    print(f"wrote {report['out_dir']}/results.json, table.md, figure.png")
    return 0


def _interrupted(summary: dict, resume: str) -> int:
    """Say where a run stopped by a signal was saved and how to continue it (`resume`); 130 or 143."""
    if summary.get("during"):
        print(f"metalearn: {summary['interrupted']} during {summary['during']}: the checkpoint of step "
              f"{summary['step']} is saved; evaluate it with\n  {resume}", file=sys.stderr)
    else:
        print(f"metalearn: {summary['interrupted']} at step {summary['step']}: checkpoint saved; continue with\n"
              f"  {resume}", file=sys.stderr)
    return 130 if summary["interrupted"] == "SIGINT" else 143


def _load_run_config(config: Optional[str], overrides: List[str], resume: bool):
    """(config file, Config) for train/pretrain. CONFIG may be a run folder (its config.yaml). With --resume,
    a run folder (or the config.yaml inside one) names the run to continue: that folder, wherever it was
    copied to, not tracking.out_dir/tracking.name saved in its config."""
    from .checkpoint import CHECKPOINT_NAME
    from .config import load_config

    run_folder = None
    if config is not None and Path(config).is_dir():
        run_folder, config = Path(config), str(Path(config) / "config.yaml")  # a run folder: its resolved config
    elif config is not None and Path(config).name == "config.yaml" and any(
            (Path(config).parent / f).is_file() for f in ("run.json", CHECKPOINT_NAME)):
        run_folder = Path(config).parent
    cfg = load_config(config, overrides)
    if resume and run_folder is not None:
        run_folder = run_folder.resolve()
        cfg.tracking.out_dir, cfg.tracking.name = str(run_folder.parent), run_folder.name
    return config, cfg


def _print_finished(summary: dict, command: str) -> int:
    print(f"run folder: {summary['run_dir']}")
    print(f"metalearn: this run already finished ({summary['step']} steps) and was evaluated; its result is below "
          f"(`metalearn eval {summary['run_dir']}` evaluates it again)", file=sys.stderr)
    print(final_line(summary["eval"]) if command == "train" else _transfer_line(summary["eval"]))
    return 0


def _transfer_line(ev: dict) -> str:
    from .transfer import summary_line

    return summary_line(ev)


def final_line(ev: dict) -> str:
    """The last line of `metalearn train`: test accuracy (or MSE) ± 95% CI and the protocol; the same line as
    `metalearn eval` prints (EvalResult.summary)."""
    from .evaluation import EvalResult

    return EvalResult.from_dict(ev).summary()


def _run_transfer(cfg, resume: bool) -> int:
    from .transfer import run_transfer, summary_line

    summary = run_transfer(cfg, resume=resume, share_init=False)
    if summary.get("finished"):  # a finished pre-training run resumed: its saved result, nothing re-run
        return _print_finished(summary, "pretrain")
    print(f"run folder: {summary['run_dir']}")
    if summary["interrupted"]:
        return _interrupted(summary, f"metalearn pretrain {Path(summary['run_dir']) / 'config.yaml'} --resume")
    if summary.get("train_seconds") is not None:
        print(f"pre-training took {summary['train_seconds']:.1f} s")
    print(summary_line(summary["eval"]))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    """Supervised pre-training (outer.algorithm=finetune is implied), then fine-tuning on fixed test episodes."""
    _, cfg = _load_run_config(args.config, ["outer.algorithm=finetune", *args.overrides], args.resume)
    return _run_transfer(cfg, args.resume)


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from . import distributed
    from ._io import atomic_json, check_writable_folder
    from .algorithms.registry import capabilities
    from .checkpoint import load_checkpoint, nonfinite_tensor
    from .config import eval_settings, from_dict, validate
    from .data.benchmark import open_benchmark
    from .evaluation import eval_runtime, run_evaluation
    from .models import build_model
    from .train import build_algorithm, resolve_device

    ckpt_path = Path(args.checkpoint)
    ckpt_path = ckpt_path / "checkpoint.pt" if ckpt_path.is_dir() else ckpt_path
    if args.out:  # before any work: a result that cannot be written is found out now, not after evaluating
        if Path(args.out).is_dir():
            raise MetalearnError(f"--out {args.out} is a folder; give a file name")
        check_writable_folder(Path(args.out).parent, "--out")
    else:
        check_writable_folder(ckpt_path.parent, "eval (the result is written next to the checkpoint; or use --out)")
    ckpt = load_checkpoint(ckpt_path)
    bad = nonfinite_tensor({"model": ckpt["model"], "algorithm": ckpt.get("algorithm") or {}})
    if bad is not None:
        raise MetalearnError(f"checkpoint {ckpt_path} holds a non-finite parameter ({bad}); refusing to evaluate it")
    cfg = from_dict(ckpt["config"])
    try:
        validate(cfg)  # the saved config itself (e.g. a NaN lr), before the command line's changes
    except MetalearnError as e:
        raise MetalearnError(f"checkpoint {ckpt_path}: saved config: {e}") from None
    # Locations come from the command line and the environment, never from the checkpoint (a checkpoint
    # from elsewhere could name any folder): data.root <- --data-root or $METALEARN_DATA/<dataset>, the
    # decode cache <- --cache-dir or $METALEARN_CACHE (default ~/.cache/metalearn); eval writes no run folder.
    cfg.data.root, cfg.data.cache_dir = args.data_root or "", args.cache_dir or ""
    cfg.tracking.out_dir, cfg.tracking.wandb.enabled = str(ckpt_path.parent), False
    cfg.tracking.tensorboard = False
    cfg = _eval_overrides(cfg, list(args.overrides))
    for key, value in [("split", args.split), ("episodes", args.episodes), ("ways", args.ways), ("shots", args.shots),
                       ("query_shots", args.query_shots), ("inner_steps", args.inner_steps),
                       ("inner_lr", args.inner_lr), ("seed", args.seed), ("batch_size", args.batch_size)]:
        if value is not None:
            setattr(cfg.eval, key, value)
    if args.device:
        cfg.device = args.device
    if args.threads is not None:
        cfg.threads = args.threads
    validate(cfg)
    if cfg.threads:  # the run's threads unless changed: the same threads give bit-identical CPU results
        torch.set_num_threads(cfg.threads)
    dist = distributed.init(cfg.device)  # torchrun: episodes sharded across processes, then gathered
    caps = capabilities(cfg.outer.algorithm)
    if dist.enabled and not caps.meta_trained:
        raise MetalearnError(f"eval of a {cfg.outer.algorithm} checkpoint runs with one process (an adapter's support "
                             f"accuracies are per process)")
    ev = eval_settings(cfg)
    if ev["ways"] != cfg.data.ways and not caps.test_ways_may_differ:
        raise MetalearnError(f"--ways {ev['ways']}: this checkpoint's head has {cfg.data.ways} outputs")
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
    benchmark = open_benchmark(cfg)
    benchmark.check_episodes(cfg.eval.split, ev["ways"], ev["shots"], ev["query_shots"])
    try:
        # an adapter (not meta-trained) evaluates the pre-trained network as saved, whatever its head's width
        outputs = benchmark.outputs if caps.meta_trained else ckpt["model"]["head.weight"].shape[0]
        model = build_model(cfg.model, benchmark.channels, outputs, cfg.data.image_size).to(device=device, dtype=dtype)
        model.load_state_dict(ckpt["model"])
        algorithm = build_algorithm(cfg, model)
        if ckpt.get("algorithm"):  # learned inner lrs (metasgd, mamlpp), reptile's Adam state
            algorithm.load_state_dict(ckpt["algorithm"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise MetalearnError(f"checkpoint {ckpt_path} does not fit its config's model "
                             f"({type(e).__name__}: {why})") from None
    distributed.main_first(lambda: benchmark.load(device))  # rank 0 decodes (and caches) first
    try:
        result = run_evaluation(cfg, algorithm, cfg.eval.split, cfg.eval.episodes, benchmark=benchmark,
                                progress=not args.no_progress)
    finally:
        distributed.shutdown()
    if not dist.is_main:
        return 0
    print(result.summary())
    record = {**result.to_dict(), **eval_runtime(cfg, algorithm)}
    if not caps.meta_trained:  # an evaluation-time adapter (finetune): support accuracy beside query accuracy
        support = algorithm.take_support()
        record.update(support_mean=support.mean().item(), support_accuracies=support.tolist())
        print(f"support accuracy after fine-tuning: {100 * record['support_mean']:.2f}%")
    # one file per setting that changes the numbers (never the training run's own eval-<split>.json); a
    # checkpoint other than checkpoint.pt gets its name in front (two checkpoints in one folder)
    out = Path(args.out) if args.out else ckpt_path.with_name(
        result.file_name("eval" if ckpt_path.stem == "checkpoint" else f"eval-{ckpt_path.stem}"))
    atomic_json({"checkpoint": str(ckpt_path), "step": ckpt["step"], "eval": record}, out)
    print(f"saved {out}")
    return 0


_EVAL_KEYS = ("eval.", "device", "threads", "outer.execution", "outer.task_chunk", "outer.compile")
"""What `metalearn eval KEY=VALUE` may change: the evaluation protocol and where/how it runs (device,
threads, execution path), never the model or how it was trained (those are the checkpoint's)."""


def _eval_overrides(cfg, overrides: List[str]):
    """cfg with `metalearn eval`'s key=value overrides applied (_EVAL_KEYS only)."""
    from .config import apply_overrides

    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if not (key.startswith("eval.") or key in _EVAL_KEYS):
            raise MetalearnError(f"eval: {key} cannot be changed when evaluating a checkpoint; only eval.* keys, "
                                 f"device, threads, outer.execution, outer.task_chunk and outer.compile "
                                 f"(the rest is the checkpoint's)")
    return apply_overrides(cfg, overrides) if overrides else cfg


def _cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import load_ablation, run_ablation

    ablation = load_ablation(args.file, seeds=args.seeds, out_dir=args.out, overrides=args.overrides)
    runs = sum(len(c.configs) for c in ablation.cells)
    print(f"ablation {ablation.name}: {len(ablation.cells)} cells x {args.seeds} seeds = {runs} runs")
    if args.dry_run:
        for cell in ablation.cells:
            print(f"  {cell.name}: " + ", ".join(f"{k}={v}" for k, v in cell.values.items()))
        return 0
    report = run_ablation(ablation, progress=not args.no_progress)
    print((Path(report["out_dir"]) / "table.md").read_text())
    print(f"wrote {report['out_dir']}/results.json, table.md, figure.png")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Meta-training throughput of a config's algorithm on synthetic images of the data set's shape."""
    import platform
    import time

    import torch

    from ._io import atomic_json
    from .algorithms.registry import capabilities
    from .config import load_config, to_dict
    from .data.benchmark import synthetic_benchmark
    from .models import build_model
    from .precision import meta_step_context, set_precision
    from .train import build_algorithm, resolve_device, seed_everything

    if args.steps < 1 or args.warmup < 0:
        raise MetalearnError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    cfg = load_config(args.config, args.overrides)
    if args.out:  # before timing anything
        from ._io import check_writable_folder

        if Path(args.out).is_dir():
            raise MetalearnError(f"--out {args.out} is a folder; give a file name")
        check_writable_folder(Path(args.out).parent, "--out")
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
    d = cfg.data
    benchmark = synthetic_benchmark(cfg)  # random images of the data set's shape; sinusoid: its own generator
    benchmark.load(device)
    sampler = benchmark.sampler(cfg.seed, dtype)
    channels = benchmark.channels
    model = build_model(cfg.model, channels, benchmark.outputs, d.image_size).to(device=device, dtype=dtype)
    algorithm = build_algorithm(cfg, model)
    set_precision(cfg.precision, device)
    optimizer = algorithm.outer_optimizer(list(model.parameters()), cfg.outer.lr)
    total = args.warmup + args.steps

    def one_step(step: int) -> None:
        batch = sampler.sample(cfg.outer.meta_batch_size)
        optimizer.zero_grad(set_to_none=True)
        algorithm.schedule(step, total, optimizer)
        with meta_step_context(cfg.precision, device):
            algorithm.meta_step(batch)
        optimizer.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(1, args.warmup + 1):
        one_step(step)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for step in range(args.warmup + 1, total + 1):
        one_step(step)
    sync()
    seconds = time.perf_counter() - t0
    result = {
        "command": "metalearn bench " + " ".join([str(args.config), *args.overrides, "--steps", str(args.steps),
                                                  "--warmup", str(args.warmup)]),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "algorithm": cfg.outer.algorithm,
        "images": [channels, d.image_size, d.image_size], "ways": d.ways, "shots": d.shots,
        "query_shots": d.query_shots,
        "meta_batch_size": cfg.outer.meta_batch_size, "inner_steps": cfg.inner.steps, "model": to_dict(cfg)["model"],
        "steps": args.steps, "warmup": args.warmup, "seconds": seconds,
        "ms_per_step": 1000 * seconds / args.steps, "tasks_per_s": args.steps * cfg.outer.meta_batch_size / seconds,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "execution": algorithm.execution_plan()[0],
        "precision": cfg.precision, "inner_checkpoint": cfg.inner.checkpoint,
    }
    from .evaluation import plural

    steps = f"{plural(cfg.inner.steps, 'inner step')}, " if capabilities(cfg.outer.algorithm).inner_loop else ""
    print(f"{cfg.outer.algorithm} {benchmark.description}, meta-batch {cfg.outer.meta_batch_size}, "
          f"{steps}{result['device']}, execution {result['execution']}, "
          f"precision {cfg.precision}: {result['ms_per_step']:.1f} ms/step, "
          f"{result['tasks_per_s']:.1f} tasks/s over {args.steps} steps")
    if args.out:
        atomic_json(result, Path(args.out))
        print(f"saved {args.out}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    """Open a data set as training would (every split source checked: a leak is the one-line error), then
    print per split its classes, images and overlaps, pixel-identical images included (metalearn/data/checks.py)."""
    from .config import load_config
    from .data import REGRESSION, SPLITS, format_report, open_dataset, split_report

    dataset, overrides = args.dataset, list(args.overrides)
    if dataset is not None and "=" in dataset:  # `metalearn data check data.root=...`: the default data set
        dataset, overrides = None, [dataset, *overrides]
    overrides = [o if "." in o.split("=", 1)[0] else f"data.{o}" for o in overrides]  # split=x means data.split=x
    if dataset in REGRESSION:
        raise MetalearnError(f"{dataset} tasks are generated: there are no split files to check")
    first = ([f"data.dataset={dataset}"] if dataset else [])
    if dataset in SPLITS and not any(o.startswith("data.split=") for o in overrides):
        first.append(f"data.split={next(iter(SPLITS[dataset]))}")  # the data set's own split by default
    cfg = load_config(None, [*first, *overrides, "data.rotation=none"])
    ds, splits = open_dataset(cfg.data)
    ds.split_check = None  # the table below counts pixel-identical images; no warning as well
    print(f"{cfg.data.dataset}, split {cfg.data.split}, {cfg.data.image_size} px: {ds.root}")
    print(format_report(split_report(ds, splits, pixels=not args.no_pixels, cache_path=ds.cache_path)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .ablate import ablation_description
    from .algorithms import ALGORITHMS
    from .data import DATASETS, REGRESSION, SPLITS
    from .models import MODELS

    print("data sets:  " + ", ".join(f"{d} (splits: {', '.join(SPLITS[d])})" for d in sorted(DATASETS)))
    print("regression: " + ", ".join(f"{d} (data.split = protocol: {', '.join(p)}; model mlp)"
                                     for d, p in sorted(REGRESSION.items())))
    print("models:     " + ", ".join(sorted(MODELS)) + "; or your own: model.name=module.path:ClassName (a "
          "torch.nn.Module subclass, imported from PYTHONPATH or the working folder; options in model.kwargs)")
    print("algorithms: " + ", ".join(sorted(ALGORITHMS)))
    from . import presets

    for title, kind, describe in [("presets", "configs", presets.description),
                                  ("ablations", "ablations", ablation_description),
                                  ("sweeps", "sweeps", presets.description)]:
        files = sorted(presets.folder(kind).glob("*.yaml"))
        if args.root:  # also the YAML files of a folder of one's own, e.g. a project's experiments/
            files += sorted((Path(args.root) / "experiments" / kind).glob("*.yaml"))
        print(f"{title} (by name, e.g. `metalearn {'ablate' if kind == 'ablations' else 'train'} "
              f"{files[0].stem if files else 'NAME'}`, or by path):")
        seen = set()
        for f in files:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            text = describe(f)
            print(f"  {f.stem}" + ("" if f.parent.resolve() == presets.folder(kind) else f"  ({f})"))
            if text:
                print(textwrap.fill(text, width=100, initial_indent="      ", subsequent_indent="      "))
    return 0


def config_reference() -> str:
    """Every config key with its type, default and the documentation line under it in config.py."""
    import ast
    import dataclasses
    import inspect

    from . import config as C

    docs = {}
    for node in ast.parse(inspect.getsource(C)).body:
        if isinstance(node, ast.ClassDef):
            for a, b in zip(node.body, node.body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                        and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                    docs[(node.name, a.target.id)] = " ".join(b.value.value.split())
    lines = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            doc = docs.get((cls.__name__, f.name), "")
            lines.append(f"  {prefix}{f.name}: {f.type} = {default!r}" + (f"\n      {doc}" if doc else ""))

    walk(C.Config, "")
    return "\n".join(lines)


def version_line() -> str:
    """"metalearn 0.1.0 (commit 1a2b3c4d, dirty), torch 2.5.1": the installed version, its source commit
    when running from a git checkout, and torch's version."""
    import torch

    from .checkpoint import metalearn_info

    info = metalearn_info()
    commit = f" (commit {info['commit'][:8]}{', dirty' if info.get('dirty') else ''})" if info.get("commit") else ""
    return f"metalearn {info['version']}{commit}, torch {torch.__version__}"


class _Version(argparse.Action):
    """--version, computed only when asked (it imports torch)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metalearn", description="Few-shot meta-learning: train, evaluate, ablate, list.")
    p.add_argument("--version", action=_Version, help="print the metalearn and torch versions and exit")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a YAML config, then evaluate on fixed test episodes",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Meta-train from a YAML preset plus key=value overrides (e.g. outer.iterations=100 "
                                   "'inner.adapt=[head.*]'). Unknown keys and wrong types are errors.\n"
                                   "Writes config.yaml, "
                                   "run.json (git commit), metrics.jsonl, checkpoint.pt, learning_curve.png and "
                                   "eval-<split>.json into tracking.out_dir/tracking.name.\nSIGINT/SIGTERM finish the "
                                   "current step, save a checkpoint and exit (130/143); `--resume` continues exactly.",
                       epilog="config keys (KEY: TYPE = DEFAULT):\n" + config_reference())
    t.add_argument("config", nargs="?", help="YAML preset (e.g. experiments/configs/maml_omniglot_5w1s.yaml), "
                                             "or a run folder / its config.yaml when resuming")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, applied after the preset; key=a,b,c runs every value (a multirun)")
    t.add_argument("--seeds", type=int, default=None,
                   help="multirun: seeds seed, seed+1, ... per combination of key=a,b values, aggregated with "
                        "95%% Student-t intervals like `metalearn ablate`")
    t.add_argument("--out", default="runs/ablations", help="multirun: output folder (default runs/ablations)")
    t.add_argument("--resume", action="store_true",
                   help="continue a run from its checkpoint.pt (bit-identical on CPU to an uninterrupted run): the "
                        "run folder given (or the folder of the config.yaml given), else "
                        "tracking.out_dir/tracking.name; a finished run only prints its result; only tracking.*, "
                        "checkpoint.*, eval.*, device and threads may differ from the checkpoint's config")
    t.set_defaults(func=_cmd_train)

    pt = sub.add_parser("pretrain",
                        help="supervised pre-training on the training classes, then per-episode fine-tuning",
                        description="Transfer-learning baseline (Chen et al. 2019): pre-train the model on all "
                                    "training classes jointly (transfer.pretrain.*), then fine-tune a fresh head and "
                                    "transfer.blocks body blocks on each fixed test episode's support set "
                                    "(eval.inner_steps, eval.inner_lr); prints query and support accuracy ± 95%% CI. "
                                    "Same run folder as `train`; outer.algorithm=finetune is implied.")
    pt.add_argument("config", help="YAML preset (e.g. experiments/configs/pretrain_omniglot.yaml) or a run folder")
    pt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied after the preset")
    pt.add_argument("--resume", action="store_true",
                    help="continue an interrupted pre-training run from its checkpoint")
    pt.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("eval", help="evaluate a checkpoint on fixed episodes; prints and saves mean ± 95%% CI",
                       description="Evaluate a checkpoint on a fixed, seeded list of episodes and save the "
                                   "per-episode accuracies, mean and 95%% CI as JSON (next to the checkpoint unless "
                                   "--out).")
    e.add_argument("checkpoint", help="checkpoint.pt or a run folder")
    e.add_argument("overrides", nargs="*", metavar="key=value",
                   help="eval.* keys, device and threads (e.g. eval.transductive=false eval.query_shots=5); "
                        "the options below win over them")
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
    e.add_argument("--threads", type=int, help="torch threads (default: the run's `threads`; 0 = torch's default)")
    e.add_argument("--out", help="where to write the JSON result (default: next to the checkpoint, "
                                 "eval-<split>-<ways>w<shots>s<query>q-<steps>-lr<lr>-<transductive|inductive>-"
                                 "seed<seed>-<episodes>ep.json: one file per setting)")
    e.add_argument("--data-root", help="data set folder (default $METALEARN_DATA/<dataset>; the checkpoint's "
                                       "data.root is not used)")
    e.add_argument("--cache-dir", help="decode cache folder (default $METALEARN_CACHE or ~/.cache/metalearn; the "
                                       "checkpoint's data.cache_dir is not used)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser("ablate", help="run an ablation grid over seeds; markdown table and figure of mean ± 95%% CI",
                       description="Run every cell of an ablation file (a base preset plus one or two varied keys) "
                                   "for --seeds seeds, then write results.json, table.md and figure.png into "
                                   "OUT/<ablation>/. Finished runs are skipped and interrupted ones resumed on a "
                                   "re-run.")
    a.add_argument("file", help="ablation YAML, e.g. experiments/ablations/inner_steps.yaml")
    a.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every cell (after the file's)")
    a.add_argument("--seeds", type=int, default=3, help="seeds per cell: seed, seed+1, ... (default 3)")
    a.add_argument("--out", default="runs/ablations", help="output folder (default runs/ablations)")
    a.add_argument("--dry-run", action="store_true", help="validate every cell and list the grid; train nothing")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=_cmd_ablate)

    b = sub.add_parser("bench", help="time meta-training steps of a config on synthetic images",
                       description="Time outer steps (sample a meta-batch, meta_step, optimiser step) of the config's "
                                   "algorithm and model on random uint8 images of the data set's shape (no data "
                                   "needed). Prints ms/step and tasks/s; --out saves JSON with the device, torch "
                                   "version and shapes.")
    b.add_argument("config", help="YAML preset")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    b.add_argument("--steps", type=int, default=20, help="timed outer steps (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed outer steps first (default 3)")
    b.add_argument("--out", help="write the result as JSON here")
    b.set_defaults(func=_cmd_bench)

    ls = sub.add_parser("list", help="show data sets, models, algorithms, presets, ablations and sweeps")
    ls.add_argument("--root", default="",
                    help="also list the YAML files under ROOT/experiments/{configs,ablations,sweeps}")
    ls.set_defaults(func=_cmd_list)

    dt = sub.add_parser("data", help="check a data set's split files")
    dt = dt.add_subparsers(dest="data_command", required=True)
    dc = dt.add_parser("check", help="check a data set's splits; print classes, images and overlaps per split",
                       description="Open a data set as `train` would: every split source is checked (a class or "
                                   "source file in two splits, a class with no images, an unknown class or a "
                                   "duplicated line is a one-line error, exit 2), then print per split its classes, "
                                   "images and overlaps, with images pixel-identical across splits (decodes the data "
                                   "set into the cache unless --no-pixels).")
    dc.add_argument("dataset", nargs="?", help="data set name (default: data.dataset's default, omniglot)")
    dc.add_argument("overrides", nargs="*", metavar="key=value",
                    help="data config keys, e.g. split=vinyals root=/data/omniglot split_file=split.json "
                         "(data. implied)")
    dc.add_argument("--no-pixels", action="store_true", help="skip the pixel-identical check (no decode)")
    dc.set_defaults(func=_cmd_data_check)
    return p


def _one_line(e: "BaseException | str") -> str:
    """An error message as one line (never empty)."""
    return " ".join(str(e).split()) or (type(e).__name__ if isinstance(e, BaseException) else "unknown error")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after an option (argparse stops collecting positionals there)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except MetalearnError as e:
        print(f"metalearn: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed outside _io (read-only folder, full disk): one line naming the path
        from ._io import describe_os_error

        print(f"metalearn: error: {_one_line(describe_os_error(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalearn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
