"""Full validation of a Config: metalearn/config.py's static checks, then the checks that need the
registries of data sets (metalearn/data), models (metalearn/models) and algorithms
(metalearn/algorithms/registry.py, with each algorithm's declared `Capabilities`).

Layer "train": this module may import data, models and algorithms; config.py (foundation) may not.
Importing it registers `check_registries` with `config.register_validator`, so `config.validate`,
`config.load_config` and `config.apply_overrides` run these checks too; metalearn/__init__.py imports
it, so they are installed whenever metalearn is imported. `validate(cfg)` here runs the whole
validation without relying on that registration.

No algorithm is named here: what an algorithm allows is asked of its declared capabilities.
"""
from __future__ import annotations

from typing import Any

from . import compiled, config
from .algorithms import registry
from .config import Config
from .data import DATASETS, REGRESSION
from .errors import MetalearnError
from .models import MODELS, model_arguments, resnet12


def validate(cfg: Config) -> None:
    """Every check of a config, before any work: `config.check_static`, then `check_registries`."""
    config.check_static(cfg)
    check_registries(cfg)


def check_registries(cfg: Config) -> None:
    """Names that come from a registry (data.dataset, model.name, outer.algorithm) are known, and the
    settings fit the data set's kind, the model and the algorithm's declared capabilities."""
    d, name = cfg.data, cfg.outer.algorithm
    if d.dataset not in DATASETS and d.dataset not in REGRESSION:
        known = ", ".join(sorted([*DATASETS, *REGRESSION]))
        raise MetalearnError(f"data.dataset: unknown data set {d.dataset!r}; known: {known}")
    _check_model(cfg)
    caps = registry.capabilities(name)  # an unknown algorithm: one line listing the known ones
    if cfg.outer.lr_halve_every and caps.own_lr_schedule:
        raise MetalearnError(f"outer.lr_halve_every: {name} has its own lr schedule; use 0")
    if cfg.inner.lora_rank and not caps.lora:
        raise MetalearnError(f"inner.lora_rank: LoRA adaptation is available for "
                             f"{', '.join(registry.supporting('lora'))}, not {name!r}")
    if cfg.inner.checkpoint and not caps.inner_checkpoint:
        raise MetalearnError(f"inner.checkpoint: not available for {name} "
                             f"({', '.join(registry.supporting('inner_checkpoint'))} only)")
    compiled.check_config(cfg)  # outer.compile: the algorithm declares it; no LoRA, inner.checkpoint, bf16/tf32
    registry.get(name).check_config(cfg)  # the algorithm's own static checks, before any data is opened
    if d.dataset in REGRESSION:
        _check_regression(cfg, REGRESSION[d.dataset], caps)
        return
    if cfg.model.name == "mlp":
        raise MetalearnError(f"model.name=mlp takes 1-d inputs (data.dataset=sinusoid), not {d.dataset} images; "
                             f"use conv4")
    if d.ways < 2:
        raise MetalearnError(f"data.ways must be >= 2, got {d.ways}")
    if cfg.eval.ways is not None and cfg.eval.ways < 2:
        raise MetalearnError(f"eval.ways must be >= 2, got {cfg.eval.ways}")
    if cfg.model.name.startswith("conv4"):
        from .models.conv4 import flat_features  # four 2x max-pools: before any decoding or caching

        try:
            flat_features(cfg.model.hidden, d.image_size)
        except ValueError as e:
            raise MetalearnError(f"data.image_size: {e}") from None
    if cfg.model.name == "resnet12":
        try:
            resnet12.check_image_size(d.image_size)
        except ValueError as e:
            raise MetalearnError(f"data.image_size: {e}") from None


def _check_model(cfg: Config) -> None:
    """model.name resolves (a shipped model, or an importable torch.nn.Module subclass at module.path:Class) and
    model.kwargs fit its constructor's signature (metalearn/models/__init__.py `model_arguments`), before any
    work. Imports your model's module; calls nothing in it."""
    d, m = cfg.data, cfg.model
    regression = d.dataset in REGRESSION
    channels = 1 if regression else getattr(DATASETS[d.dataset], "channels", 3)
    model_arguments(m, channels, 1 if regression else d.ways, d.image_size)  # names only: builds nothing
    if m.name == "resnet12":
        try:
            resnet12.check_options(**m.kwargs)  # its keys are the constructor's options (checked above)
        except ValueError as e:
            raise MetalearnError(f"model.kwargs: {e}") from None


def _check_regression(cfg: Config, protocols: Any, caps: registry.Capabilities) -> None:
    """data.dataset=sinusoid: 1-d regression with an MLP, one output, MSE."""
    d = cfg.data
    if cfg.model.name in MODELS and cfg.model.name != "mlp":  # your own model (module:Class) may take 1-d x
        raise MetalearnError(f"model.name={cfg.model.name} cannot take {d.dataset} inputs (1-d x): use model.name=mlp")
    if d.ways != 1 or (cfg.eval.ways is not None and cfg.eval.ways != 1):
        raise MetalearnError(f"data.ways (and eval.ways) must be 1 for {d.dataset} regression (one output), got "
                             f"{d.ways if d.ways != 1 else cfg.eval.ways}")
    if d.split not in protocols:
        raise MetalearnError(f"data.split: {d.dataset} protocols are {', '.join(protocols)}, got {d.split!r}")
    if d.rotation != "none":
        raise MetalearnError(f"data.rotation={d.rotation} does not apply to {d.dataset} regression; use none")
    if d.augment:
        raise MetalearnError(f"data.augment augments images; {d.dataset} regression has none: use data.augment=[]")
    # ProtoNet's class prototypes and the fine-tuning baseline's fresh N-way head are classification only
    if not caps.regression:
        raise MetalearnError(f"outer.algorithm={cfg.outer.algorithm} is for classification, not {d.dataset} regression")


config.register_validator(check_registries)

__all__ = ["check_registries", "validate"]
