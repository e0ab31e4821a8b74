"""Ablations: a base preset, one or two fields varied over a grid, several seeds per cell.

An ablation file (see experiments/ablations/):

    description: Inner-loop steps during meta-training        # one line for tables and `metalearn list`
    base: ../configs/omniglot_5w1s_quick.yaml                # preset, relative to this file
    overrides: [outer.iterations=300]                         # optional key=value list for every cell
    vary:                                                     # config keys -> values (any number)
      inner.steps: [1, 2, 3, 5]

`run_ablation` builds and validates every cell's config (and opens its data set) before any
training starts, then trains each cell with seeds `seed, seed+1, ...` into
`<out>/<ablation>/<cell>-seed<i>/`. The evaluation episodes (eval.seed) are the same in every
run, so cells are compared on identical episodes. Per cell it reports the mean over seeds of the
runs' final accuracy with a 95% Student-t interval over seeds (metalearn/stats.py: t = 12.71 at
2 seeds, 4.30 at 3); with one seed, the run's own 95% CI over its test episodes, labelled as such.
It writes `results.json`, `table.md` and `figure.png` (accuracy against the first varied key, one
series per combination of the others), each stating the settings that produced it (iterations,
episodes, commit). A re-run reuses a finished run only if its saved resolved config equals the
cell's (logging and checkpoint settings aside), resumes interrupted ones from their checkpoints,
and stops with a one-line error naming the differing keys otherwise. With W&B enabled the
runs share the group `<ablation>`.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ._io import atomic_json, atomic_write
from .algorithms import registry
from .config import Config, check_moved, load_config
from .errors import MetalearnError
from .stats import t_interval
from .validation import validate

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
    check_moved(values, where)
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
    from .presets import resolve  # a path, or the name of a shipped ablation

    path = resolve(path, "ablations")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MetalearnError(f"ablation file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise MetalearnError(f"ablation file {path}: expected a mapping with base and vary")
    unknown = sorted(set(spec) - _FILE_KEYS)
    if unknown:
        raise MetalearnError(f"ablation file {path}: unknown key {unknown[0]!r}; "
                             f"known: {', '.join(sorted(_FILE_KEYS))}")
    if "base" not in spec or "vary" not in spec:
        raise MetalearnError(f"ablation file {path}: needs `base` (a preset) and `vary` (key: [values])")
    base = Path(spec["base"])
    if not base.is_absolute() and (path.parent / base).is_file():
        base = path.parent / base
    vary = spec["vary"]
    if not isinstance(vary, dict) or not vary:
        raise MetalearnError(f"ablation file {path}: `vary` must map config keys to lists of values")
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise MetalearnError(f"ablation file {path}: vary.{key} must be a non-empty list of values")
    file_overrides = spec.get("overrides") or []
    if not isinstance(file_overrides, list):
        raise MetalearnError(f"ablation file {path}: `overrides` must be a list of key=value strings")
    return build_ablation(path.stem, str(spec.get("description", "")), path, base,
                          [*map(str, file_overrides), *overrides], vary, seeds=seeds, out_dir=out_dir,
                          where=f"ablation file {path}: vary")


def build_ablation(name: str, description: str, path: Path, base: "str | Path | None", overrides: Sequence[str],
                   vary: Dict[str, List[Any]], *, seeds: int, out_dir: str | Path, where: str) -> Ablation:
    """The grid: every combination of `vary`'s values applied to the base preset + overrides, with
    `seeds` seeds each; every config validated, nothing run or written."""
    if seeds < 1:
        raise MetalearnError(f"--seeds must be >= 1, got {seeds}")
    base_cfg = load_config(base, list(overrides))
    keys = list(vary)
    cells = []
    for i, combo in enumerate(itertools.product(*(vary[k] for k in keys))):
        values = dict(zip(keys, combo))
        cell = Cell(values, _cell_name(i, values))
        cfg = _with_values(base_cfg, values, where=where)
        for s in range(seeds):
            tags = sorted(set(cfg.tracking.wandb.tags) | {"ablate"})
            cell.configs.append(_with_values(cfg, {
                "seed": cfg.seed + s, "tracking.out_dir": str(Path(out_dir) / name),
                "tracking.name": f"{cell.name}-seed{s}",
                "tracking.wandb.group": cfg.tracking.wandb.group or name, "tracking.wandb.tags": tags,
            }, where=f"ablation {name}"))
        cells.append(cell)
    return Ablation(name, description, path, keys, cells)


def split_multirun(overrides: Sequence[str]) -> "tuple[List[str], Dict[str, List[Any]]]":
    """`key=a,b,c` overrides (a comma outside brackets and quotes) -> (the plain overrides, {key: [a, b, c]}),
    each value parsed as YAML (0.1 -> float, true -> bool, [head.*] -> list), as in an ablation file's vary."""
    plain, vary = [], {}
    for ov in overrides:
        key, sep, value = ov.partition("=")
        parts, depth, quote, cur = [], 0, "", ""
        for ch in value:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch in "[{(":
                depth += 1
            elif ch in "]})":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            cur += ch
        parts.append(cur)
        if not sep or len(parts) == 1:
            plain.append(ov)
            continue
        if any(not p.strip() for p in parts):
            raise MetalearnError(f"override {ov!r}: an empty value in the comma-separated list")
        vary[key.strip()] = [yaml.safe_load(p) for p in parts]
    return plain, vary


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
            stale = _differs_from_saved(cfg, run_dir)
            if stale:
                raise MetalearnError(f"{run_dir} holds a run of another setup ({stale}); use another --out or "
                                     f"remove that folder to train this cell anew")
            if finished.is_file():
                summary = json.loads(finished.read_text())
            else:
                if progress:
                    print(f"[{done}/{total}] {ablation.name}: {cfg.tracking.name}", flush=True)
                cfg.tracking.progress = cfg.tracking.progress and progress
                if not registry.capabilities(cfg.outer.algorithm).meta_trained:
                    # the transfer baseline: shared initial weights, then fine-tuning
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
        mean, ci, interval = _cell_interval(runs)
        results.append({"values": cell.values, "name": cell.name, "mean": mean, "ci95": ci, "interval": interval,
                        "seeds": len(runs), "runs": runs})
        if all("support_accuracy" in r for r in runs):
            s_mean, s_ci = t_interval([r["support_accuracy"] for r in runs])
            s_ci = 0.0 if math.isnan(s_ci) else s_ci
            results[-1].update(support_mean=s_mean, support_ci95=s_ci, adapted_parameters=runs[0]["adapted_parameters"])
    cfg0 = ablation.cells[0].configs[0]
    kind = "mse" if cfg0.data.dataset == "sinusoid" else "accuracy"  # per-run values sit under "accuracy" either way
    report = {"ablation": ablation.name, "description": ablation.description, "file": str(ablation.path),
              "keys": ablation.keys, "metric": f"{cfg0.eval.split} {kind}", "settings": _settings(cfg0),
              "cells": results}
    atomic_json(report, out / "results.json")
    atomic_write(out / "table.md", lambda f: f.write(markdown_table(report)), mode="w")
    plot_ablation(report, out / "figure.png")
    report["out_dir"] = str(out)
    return report


def _differs_from_saved(cfg: Config, run_dir: Path) -> str:
    """'' if run_dir has no saved config or one equal to cfg's (tracking and checkpoint settings aside:
    they change no number), else the differing keys with both values (at most four named)."""
    from .config import from_dict, to_dict
    from .train import _flatten

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return ""
    try:
        then = _flatten(to_dict(from_dict(OmegaConf.to_container(OmegaConf.load(saved)))))
    except (MetalearnError, OmegaConfBaseException, yaml.YAMLError, OSError) as e:
        return f"its config.yaml is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    now = _flatten(to_dict(cfg))
    diff = [f"{key}: trained with {then.get(key)!r}, this ablation asks for {now.get(key)!r}"
            for key in sorted(set(now) | set(then))
            if not key.startswith(("tracking.", "checkpoint.")) and now.get(key) != then.get(key)]
    return "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")


def _cell_interval(runs: List[Dict[str, Any]]) -> "tuple[float, float, str]":
    """(mean, 95% half-width, what the interval is over): Student t over seeds, or with one seed the
    run's own interval over its test episodes."""
    if len(runs) == 1:
        return runs[0]["accuracy"], runs[0]["ci95"], "episodes (one seed)"
    mean, ci = t_interval([r["accuracy"] for r in runs])
    return mean, ci, f"seeds (Student t, n={len(runs)})"


def _settings(cfg: Config) -> Dict[str, Any]:
    """What produced the numbers: training length, evaluation protocol, code version."""
    from .checkpoint import git_info

    git = git_info(Path(__file__).resolve().parents[1]) or {}
    return {"outer.iterations": cfg.outer.iterations, "eval.episodes": cfg.eval.episodes,
            "eval.split": cfg.eval.split, "eval.query_shots": cfg.eval.query_shots,
            "commit": (git.get("commit") or "")[:10] + ("+dirty" if git.get("dirty") else ""),
            "metalearn": _version()}


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("metalearn")
    except metadata.PackageNotFoundError:
        return "unknown"


def settings_line(report: Dict[str, Any]) -> str:
    st = report.get("settings") or {}
    return ", ".join(f"{k}={v}" for k, v in st.items() if v not in ("", None))


def _scale(report: Dict[str, Any]) -> "tuple[float, str]":
    """(factor, unit) for shown values: accuracy in %, MSE as is."""
    return (1.0, "") if report["metric"].endswith("mse") else (100.0, " (%)")


def markdown_table(report: Dict[str, Any]) -> str:
    keys = report["keys"]
    k, unit = _scale(report)
    lines = [f"# Ablation: {report['ablation']}", ""]
    if report["description"]:
        lines += [report["description"], ""]
    lines += [f"{report['metric']}{unit}: mean over seeds ± 95% Student-t interval over seeds (t·s/√n, "
              f"n−1 degrees of freedom); a cell with one seed shows its run's 95% CI over test episodes instead "
              f"(column `interval over`).", ""]
    if report.get("settings"):
        lines += [f"Settings: {settings_line(report)}.", ""]
    support = any("support_mean" in c for c in report["cells"])  # fine-tuning runs: support accuracy beside
    extra = ["support accuracy (%)", "adapted parameters"] if support else []
    lines.append("| " + " | ".join([*keys, report["metric"].split()[-1] + unit, "interval over", *extra, "seeds",
                                     f"per seed{unit}"]) + " |")
    lines.append("|" + "---|" * (len(keys) + 4 + len(extra)))
    for c in report["cells"]:
        ci = f" ± {k * c['ci95']:.2f}"
        over = c.get("interval", "seeds" if c["seeds"] > 1 else "-")
        per_seed = ", ".join(f"{k * r['accuracy']:.2f}" for r in c["runs"])
        cols = []
        if support:
            s_ci = f" ± {100 * c['support_ci95']:.2f}" if c["seeds"] > 1 and "support_mean" in c else ""
            cols = [f"{100 * c['support_mean']:.2f}{s_ci}" if "support_mean" in c else "-",
                    str(c.get("adapted_parameters", "-"))]
        lines.append("| " + " | ".join([*(_label(c["values"][key]) for key in keys),
                                         f"{k * c['mean']:.2f}{ci}", over, *cols, str(c["seeds"]), per_seed]) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(report: Dict[str, Any], path: str | Path) -> Path:
    """Accuracy against the first varied key, one series per combination of the other keys, with 95%
    intervals. A numeric first key is a line with a band; a categorical one (algorithms, flags) gets
    markers with error bars and no connecting line, since its order implies no trend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, cells = report["keys"], report["cells"]
    k, unit = _scale(report)
    if not keys:  # seeds only (a multirun without varied keys): one categorical point
        keys, cells = ["run"], [{**c, "values": {"run": "all seeds"}} for c in cells]
    xkey = keys[0]
    xs = list(dict.fromkeys(_label(c["values"][xkey]) for c in cells))
    numeric = all(isinstance(c["values"][xkey], (int, float)) and not isinstance(c["values"][xkey], bool)
                  for c in cells)
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for c in cells:
        label = ", ".join(f"{key}={_label(c['values'][key])}" for key in keys[1:])
        groups.setdefault(label, []).append(c)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    # categorical x: series side by side around each tick, so their error bars do not overlap
    offsets = [0.0 if numeric else (i - (len(groups) - 1) / 2) * 0.08 for i in range(len(groups))]
    for (label, cs), off in zip(groups.items(), offsets):
        x = [c["values"][xkey] if numeric else xs.index(_label(c["values"][xkey])) + off for c in cs]
        m = [k * c["mean"] for c in cs]
        ci = [0.0 if math.isnan(c["ci95"]) else k * c["ci95"] for c in cs]
        if numeric:
            line, = ax.plot(x, m, marker="o", label=label or None)
            ax.fill_between(x, [a - b for a, b in zip(m, ci)], [a + b for a, b in zip(m, ci)], alpha=0.2,
                            color=line.get_color())
            color = line.get_color()
        else:
            bars = ax.errorbar(x, m, yerr=ci, fmt="o", capsize=4, label=label or None)
            color = bars.lines[0].get_color()
        if all("support_mean" in c for c in cs):  # fine-tuning: support accuracy, dashed (overfitting shows)
            ax.plot(x, [100 * c["support_mean"] for c in cs], linestyle="--" if numeric else "none", marker=".",
                    color=color, label=f"support, {label}" if label else "support")
    if not numeric:
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlim(-0.5, len(xs) - 0.5)
    elif all(isinstance(c["values"][xkey], int) for c in cells):
        ax.set_xticks(sorted({c["values"][xkey] for c in cells}))
    ax.set_xlabel(xkey)
    ax.set_ylabel(f"{report['metric']}{unit}")
    over = {c.get("interval", "seeds") for c in cells}
    title = f"{report['ablation']}: mean ± 95% interval over {' / '.join(sorted(over))}"
    settings = settings_line(report)
    ax.set_title(title + (f"\n{settings}" if settings else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
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
