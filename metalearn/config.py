"""Typed, documented configuration.

A run is described by one `Config`: dataclasses with defaults, merged (by OmegaConf
structured configs) from a YAML preset and then `key=value` overrides. Presets only
override defaults. Unknown keys and values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import MetalearnError


@dataclass
class DataConfig:
    dataset: str = "omniglot"
    """Data set name (see `metalearn list`)."""
    root: str = ""
    """Folder holding the data set; empty means `$METALEARN_DATA/<dataset>`."""
    cache_dir: str = ""
    """Where decoded uint8 tensors are cached; empty means `$METALEARN_CACHE` or ~/.cache/metalearn."""
    split: str = "maml"
    """Class split: `maml` = seeded random 1100 train / 100 val / 423 test characters (MAML's code)."""
    split_seed: int = 1
    image_size: int = 28
    ways: int = 5
    """N: classes per task."""
    shots: int = 1
    """K: labelled support examples per class."""
    query_shots: int = 15
    """Q: query examples per class, used for the outer loss and for scoring."""


@dataclass
class ModelConfig:
    name: str = "conv4"
    hidden: int = 64
    """Filters per conv layer."""
    batchnorm: str = "transductive"
    """`transductive`: BatchNorm always uses the current batch's statistics (MAML's setting); `none`: no BatchNorm."""


@dataclass
class InnerConfig:
    lr: float = 0.4
    """alpha: inner-loop SGD step size."""
    steps: int = 1
    """Inner-loop SGD steps on the support set during meta-training."""
    first_order: bool = False
    """Drop second-order terms of the meta-gradient (FOMAML)."""
    adapt: List[str] = field(default_factory=lambda: ["*"])
    """Name patterns (fnmatch) of the parameters the inner loop adapts: ['*'] = all (MAML), ['head.*'] = ANIL-style."""


@dataclass
class OuterConfig:
    algorithm: str = "maml"
    """`maml` (second order unless inner.first_order) or `fomaml` (forces first order)."""
    lr: float = 1e-3
    """beta: Adam step size of the outer loop."""
    meta_batch_size: int = 32
    """Tasks per outer step."""
    iterations: int = 60000
    """Outer steps."""
    train: List[str] = field(default_factory=lambda: ["*"])
    """Name patterns of the parameters the outer loop trains; the rest stay frozen."""


@dataclass
class EvalConfig:
    split: str = "test"
    episodes: int = 600
    """Number of fixed, enumerated evaluation episodes."""
    seed: int = 0
    """Seed that fixes the evaluation episodes."""
    ways: Optional[int] = None
    """Defaults to data.ways."""
    shots: Optional[int] = None
    """Defaults to data.shots."""
    query_shots: int = 15
    inner_steps: Optional[int] = None
    """Inner steps at test time; defaults to inner.steps."""
    inner_lr: Optional[float] = None
    """Inner lr at test time; defaults to inner.lr."""
    batch_size: int = 50
    """Episodes adapted together (memory knob only; results do not depend on it)."""
    val_every: int = 0
    """Validate every N outer steps on `val_episodes` validation episodes (0 = never)."""
    val_episodes: int = 100


@dataclass
class TrackingConfig:
    out_dir: str = "runs"
    name: str = ""
    """Run folder name under out_dir; empty = <dataset>-<ways>w<shots>s-<timestamp>."""
    log_every: int = 10
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass
class Config:
    seed: int = 0
    device: str = "cpu"
    """`cpu`, `cuda`, `cuda:N` or `auto`."""
    dtype: str = "float32"
    threads: int = 0
    """torch.set_num_threads; 0 leaves torch's default."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).strip().splitlines()[0]
    key = getattr(e, "full_key", None)
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return msg


def load_config(path: str | Path | None = None, overrides: List[str] | None = None) -> Config:
    """Defaults <- YAML preset at `path` <- `key=value` overrides, then validated."""
    base = OmegaConf.structured(Config)
    try:
        layers = [base]
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise MetalearnError(f"config file not found: {p}")
            try:
                loaded = OmegaConf.load(p)
            except Exception as e:  # YAML syntax errors
                raise MetalearnError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
            layers.append(loaded)
        for ov in overrides or []:
            if "=" not in ov:
                raise MetalearnError(f"override {ov!r} is not of the form key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise MetalearnError(f"config: {_one_line(e)}") from None
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict` (e.g. from a checkpoint)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise MetalearnError(f"saved config: {_one_line(e)}") from None


def _positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise MetalearnError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Static checks that need no data; data-dependent checks happen when the data set is opened."""
    from .data import DATASETS  # local import: data imports config's neighbours only
    from .models import MODELS

    if cfg.data.dataset not in DATASETS:
        raise MetalearnError(f"data.dataset: unknown data set {cfg.data.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    if cfg.model.name not in MODELS:
        raise MetalearnError(f"model.name: unknown model {cfg.model.name!r}; known: {', '.join(sorted(MODELS))}")
    if cfg.model.batchnorm not in ("transductive", "none"):
        raise MetalearnError(f"model.batchnorm must be 'transductive' or 'none', got {cfg.model.batchnorm!r}")
    if cfg.outer.algorithm not in ("maml", "fomaml"):
        raise MetalearnError(f"outer.algorithm: unknown algorithm {cfg.outer.algorithm!r}; known: fomaml, maml")
    if cfg.data.ways < 2:
        raise MetalearnError(f"data.ways must be >= 2, got {cfg.data.ways}")
    if cfg.eval.ways is not None and cfg.eval.ways < 2:
        raise MetalearnError(f"eval.ways must be >= 2, got {cfg.eval.ways}")
    for name, value in [
        ("data.shots", cfg.data.shots), ("data.query_shots", cfg.data.query_shots),
        ("data.image_size", cfg.data.image_size), ("model.hidden", cfg.model.hidden),
        ("inner.lr", cfg.inner.lr), ("outer.lr", cfg.outer.lr),
        ("outer.meta_batch_size", cfg.outer.meta_batch_size),
        ("eval.episodes", cfg.eval.episodes), ("eval.shots", cfg.eval.shots),
        ("eval.query_shots", cfg.eval.query_shots), ("eval.batch_size", cfg.eval.batch_size),
        ("eval.inner_lr", cfg.eval.inner_lr), ("eval.val_episodes", cfg.eval.val_episodes),
        ("tracking.log_every", cfg.tracking.log_every),
    ]:
        _positive(name, value)
    for name, value in [
        ("inner.steps", cfg.inner.steps), ("outer.iterations", cfg.outer.iterations),
        ("eval.inner_steps", cfg.eval.inner_steps), ("eval.val_every", cfg.eval.val_every),
        ("threads", cfg.threads),
    ]:
        _positive(name, value, allow_zero=True)
    if cfg.dtype not in ("float32", "float64"):
        raise MetalearnError(f"dtype must be 'float32' or 'float64', got {cfg.dtype!r}")
    if cfg.eval.split not in ("train", "val", "test"):
        raise MetalearnError(f"eval.split must be train, val or test, got {cfg.eval.split!r}")
    if not cfg.inner.adapt:
        raise MetalearnError("inner.adapt is empty: name at least one parameter pattern (e.g. ['*'] or ['head.*'])")
    if not cfg.outer.train:
        raise MetalearnError("outer.train is empty: name at least one parameter pattern")
    dev = cfg.device
    if not (dev in ("cpu", "auto", "cuda") or dev.startswith("cuda:")):
        raise MetalearnError(f"device must be cpu, cuda, cuda:N or auto, got {dev!r}")
