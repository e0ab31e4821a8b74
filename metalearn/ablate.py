"""Ablations: a base preset, one or two fields varied over a grid, several seeds per cell.

An ablation file (see experiments/ablations/):

    description: Inner-loop steps during meta-training        # one line for tables and `metalearn list`
    base: ../configs/omniglot_5w1s_quick.yaml                # preset, relative to this file
    overrides: [outer.iterations=300]                         # optional key=value list for every cell
    vary:                                                     # one or two config keys -> values
      inner.steps: [1, 2, 3, 5]

`run_ablation` builds and validates every cell's config (and opens its data set) before any
training starts, then trains each cell with seeds `seed, seed+1, ...` into
`<out>/<ablation>/<cell>-seed<i>/`. The evaluation episodes (eval.seed) are the same in every
run, so cells are compared on identical episodes. Per cell it reports the mean over seeds of the
runs' final accuracy, with a 95% CI over seeds, 1.96 * s / sqrt(n) (s: sample std across seeds;
0 with one seed), and writes `results.json`, `table.md` and `figure.png` (accuracy against the
first varied field, one line per value of the second, CI bands). A re-run skips finished runs
and resumes interrupted ones from their checkpoints. With W&B enabled the runs share the group
`<ablation>`.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ._io import atomic_json, atomic_write
from .config import Config, load_config, validate
from .errors import MetalearnError
from .evaluation import mean_ci95

_FILE_KEYS = {"description", "base", "overrides", "vary"}


@dataclass
class Cell:
    values: Dict[str, Any]
    """Varied key -> value of this cell."""
    name: str
    configs: List[Config] = field(default_factory=list)
    """One config per seed."""


@dataclass
class Ablation:
    name: str
    description: str
    path: Path
    keys: List[str]
    cells: List[Cell]


def _with_values(cfg: Config, values: Dict[str, Any], where: str) -> Config:
    """cfg with dotted keys set to values; unknown keys and wrong types are errors naming the key."""
    nested: Dict[str, Any] = {}
    for key, value in values.items():
        d = nested
        *parents, last = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    try:
        new = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.create(nested)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise MetalearnError(f"{where}: {key + ': ' if key else ''}{str(e).strip().splitlines()[0]}") from None
    validate(new)  # type: ignore[arg-type]
    return new  # type: ignore[return-value]


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cell_name(index: int, values: Dict[str, Any]) -> str:
    text = "_".join(f"{k.split('.')[-1]}-{_label(v)}" for k, v in values.items()).replace("*", "all")
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9._=-]+", "", text)[:80]


def load_ablation(path: str | Path, *, seeds: int = 3, out_dir: str | Path = "runs/ablations",
                  overrides: Sequence[str] = ()) -> Ablation:
    """Parse and validate an ablation file: every cell's config for every seed, nothing run or written."""
    path = Path(path)
    if not path.is_file():
        raise MetalearnError(f"ablation file not found: {path}")
    if seeds < 1:
        raise MetalearnError(f"--seeds must be >= 1, got {seeds}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MetalearnError(f"ablation file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise MetalearnError(f"ablation file {path}: expected a mapping with base and vary")
    unknown = sorted(set(spec) - _FILE_KEYS)
    if unknown:
        raise MetalearnError(f"ablation file {path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(_FILE_KEYS))}")
    if "base" not in spec or "vary" not in spec:
        raise MetalearnError(f"ablation file {path}: needs `base` (a preset) and `vary` (key: [values])")
    base = Path(spec["base"])
    if not base.is_absolute() and (path.parent / base).is_file():
        base = path.parent / base
    vary = spec["vary"]
    if not isinstance(vary, dict) or not 1 <= len(vary) <= 2:
        raise MetalearnError(f"ablation file {path}: `vary` must map one or two config keys to lists of values")
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise MetalearnError(f"ablation file {path}: vary.{key} must be a non-empty list of values")
    file_overrides = spec.get("overrides") or []
    if not isinstance(file_overrides, list):
        raise MetalearnError(f"ablation file {path}: `overrides` must be a list of key=value strings")
    name = path.stem
    base_cfg = load_config(base, [*map(str, file_overrides), *overrides])
    keys = list(vary)
    cells = []
    for i, combo in enumerate(itertools.product(*(vary[k] for k in keys))):
        values = dict(zip(keys, combo))
        cell = Cell(values, _cell_name(i, values))
        cfg = _with_values(base_cfg, values, where=f"ablation file {path}: vary")
        for s in range(seeds):
            tags = sorted(set(cfg.tracking.wandb.tags) | {"ablate"})
            cell.configs.append(_with_values(cfg, {
                "seed": cfg.seed + s, "tracking.out_dir": str(Path(out_dir) / name),
                "tracking.name": f"{cell.name}-seed{s}",
                "tracking.wandb.group": cfg.tracking.wandb.group or name, "tracking.wandb.tags": tags,
            }, where=f"ablation {name}"))
        cells.append(cell)
    return Ablation(name, str(spec.get("description", "")), path, keys, cells)


def run_ablation(ablation: Ablation, *, progress: bool = True) -> Dict[str, Any]:
    """Train every (cell, seed), aggregate, write results.json, table.md and figure.png."""
    from .train import check_data, train

    for cell in ablation.cells:  # bad input stops here, before any run
        for cfg in cell.configs:
            check_data(cfg)
    out = Path(ablation.cells[0].configs[0].tracking.out_dir)
    total = sum(len(c.configs) for c in ablation.cells)
    done = 0
    results = []
    for cell in ablation.cells:
        runs = []
        for cfg in cell.configs:
            done += 1
            run_dir = Path(cfg.tracking.out_dir) / cfg.tracking.name
            finished = run_dir / f"eval-{cfg.eval.split}.json"
            if finished.is_file():
                summary = json.loads(finished.read_text())
            else:
                if progress:
                    print(f"[{done}/{total}] {ablation.name}: {cfg.tracking.name}", flush=True)
                cfg.tracking.progress = cfg.tracking.progress and progress
                if cfg.outer.algorithm == "finetune":  # transfer baseline: shared initial weights, then fine-tuning
                    from .transfer import run_transfer

                    summary = run_transfer(cfg, progress=progress)
                else:
                    summary = train(cfg, resume=(run_dir / "checkpoint.pt").is_file())
                if summary["interrupted"]:
                    raise KeyboardInterrupt
            runs.append({"run_dir": str(run_dir), "seed": cfg.seed, "accuracy": summary["eval"]["mean"],
                         "ci95": summary["eval"]["ci95"], "train_seconds": summary["train_seconds"]})
            if "support_mean" in summary["eval"]:  # fine-tuning runs also report support accuracy (overfitting)
                runs[-1].update(support_accuracy=summary["eval"]["support_mean"],
                                adapted_parameters=summary["eval"]["adapted_parameters"])
        accs = torch.tensor([r["accuracy"] for r in runs], dtype=torch.float64)
        mean, ci = mean_ci95(accs)
        results.append({"values": cell.values, "name": cell.name, "mean": mean, "ci95": ci, "seeds": len(runs),
                        "runs": runs})
        if all("support_accuracy" in r for r in runs):
            s_mean, s_ci = mean_ci95(torch.tensor([r["support_accuracy"] for r in runs], dtype=torch.float64))
            results[-1].update(support_mean=s_mean, support_ci95=s_ci, adapted_parameters=runs[0]["adapted_parameters"])
    cfg0 = ablation.cells[0].configs[0]
    kind = "mse" if cfg0.data.dataset == "sinusoid" else "accuracy"  # per-run values sit under "accuracy" either way
    report = {"ablation": ablation.name, "description": ablation.description, "file": str(ablation.path),
              "keys": ablation.keys, "metric": f"{cfg0.eval.split} {kind}", "cells": results}
    atomic_json(report, out / "results.json")
    atomic_write(out / "table.md", lambda f: f.write(markdown_table(report)), mode="w")
    plot_ablation(report, out / "figure.png")
    report["out_dir"] = str(out)
    return report


def _scale(report: Dict[str, Any]) -> "tuple[float, str]":
    """(factor, unit) for shown values: accuracy in %, MSE as is."""
    return (1.0, "") if report["metric"].endswith("mse") else (100.0, " (%)")


def markdown_table(report: Dict[str, Any]) -> str:
    keys = report["keys"]
    k, unit = _scale(report)
    lines = [f"# Ablation: {report['ablation']}", ""]
    if report["description"]:
        lines += [report["description"], ""]
    lines += [f"{report['metric']}{unit}, mean over seeds ± 95% CI over seeds (1.96·s/√n).", ""]
    support = any("support_mean" in c for c in report["cells"])  # fine-tuning runs: support accuracy beside
    extra = ["support accuracy (%)", "adapted parameters"] if support else []
    lines.append("| " + " | ".join([*keys, report["metric"].split()[-1] + unit, *extra, "seeds", f"per seed{unit}"]) + " |")
    lines.append("|" + "---|" * (len(keys) + 3 + len(extra)))
    for c in report["cells"]:
        ci = f" ± {k * c['ci95']:.2f}" if c["seeds"] > 1 else ""
        per_seed = ", ".join(f"{k * r['accuracy']:.2f}" for r in c["runs"])
        cols = []
        if support:
            s_ci = f" ± {100 * c['support_ci95']:.2f}" if c["seeds"] > 1 and "support_mean" in c else ""
            cols = [f"{100 * c['support_mean']:.2f}{s_ci}" if "support_mean" in c else "-",
                    str(c.get("adapted_parameters", "-"))]
        lines.append("| " + " | ".join([*(_label(c["values"][k]) for k in keys),
                                         f"{k * c['mean']:.2f}{ci}", *cols, str(c["seeds"]), per_seed]) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(report: Dict[str, Any], path: str | Path) -> Path:
    """Accuracy against the first varied key (numeric axis if all its values are numbers), one line per
    value of the second key, with 95% CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, cells = report["keys"], report["cells"]
    k, unit = _scale(report)
    xkey = keys[0]
    xs = list(dict.fromkeys(_label(c["values"][xkey]) for c in cells))
    numeric = all(isinstance(c["values"][xkey], (int, float)) and not isinstance(c["values"][xkey], bool) for c in cells)
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(_label(c["values"][keys[1]]) if len(keys) > 1 else "", []).append(c)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, cs in groups.items():
        x = [c["values"][xkey] if numeric else xs.index(_label(c["values"][xkey])) for c in cs]
        m = [k * c["mean"] for c in cs]
        ci = [k * c["ci95"] for c in cs]
        line, = ax.plot(x, m, marker="o", label=f"{keys[1]}={label}" if label else None)
        ax.fill_between(x, [a - b for a, b in zip(m, ci)], [a + b for a, b in zip(m, ci)], alpha=0.2,
                        color=line.get_color())
        if all("support_mean" in c for c in cs):  # fine-tuning: support accuracy, dashed (overfitting shows)
            ax.plot(x, [100 * c["support_mean"] for c in cs], linestyle="--", marker=".", color=line.get_color(),
                    label=f"support, {keys[1]}={label}" if label else "support")
    if not numeric:
        ax.set_xticks(range(len(xs)), xs)
    elif all(isinstance(c["values"][xkey], int) for c in cells):
        ax.set_xticks(sorted({c["values"][xkey] for c in cells}))
    ax.set_xlabel(xkey)
    ax.set_ylabel(f"{report['metric']}{unit}")
    ax.set_title(f"{report['ablation']} (mean ± 95% CI over seeds)")
    ax.grid(alpha=0.3)
    if len(keys) > 1 or any("support_mean" in c for c in cells):
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return Path(path)


def ablation_description(path: str | Path) -> str:
    try:
        spec = yaml.safe_load(Path(path).read_text())
        return str(spec.get("description", "")) if isinstance(spec, dict) else ""
    except (OSError, yaml.YAMLError):
        return ""
