"""Typed, documented configuration.

A run is described by one `Config`: dataclasses with defaults, merged (by OmegaConf
structured configs) from a YAML preset and then `key=value` overrides. Presets only
override defaults. Unknown keys and values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import MetalearnError

EXECUTIONS = ("auto", "loop", "batched", "hybrid")  # outer.execution (metalearn/algorithms/base.py)
PRECISIONS = ("fp32", "tf32", "bf16")  # precision (metalearn/precision.py)


@dataclass
class DataConfig:
    dataset: str = "omniglot"
    """Data set name (see `metalearn list`); `sinusoid` = MAML's sinusoid regression tasks (needs
    model.name=mlp, data.ways=1; data.split picks the protocol: `maml` phase U[0, pi], `reptile` U[0, 2 pi])."""
    root: str = ""
    """Folder holding the data set; empty means `$METALEARN_DATA/<dataset>`."""
    cache_dir: str = ""
    """Where decoded uint8 tensors are cached; empty means `$METALEARN_CACHE` or ~/.cache/metalearn."""
    split: str = "maml"
    """Class split (see `metalearn list`). omniglot: `maml` = seeded random 1100/100/423 characters
    (MAML's code), `vinyals` = 1028/172/423 (Matching/Prototypical Networks), `lake` = background /
    evaluation alphabets (no val); mini-imagenet and tiered-imagenet: `standard`; cifar-fs: `standard`
    (Bertinetto); fc100: `standard` (Oreshkin, by superclass); folder: `file` (data.split_file)."""
    split_seed: int = 1
    split_file: str = ""
    """folder data set: JSON file {"train": [class folders], "val": [...], "test": [...]}."""
    rotation: str = "none"
    """Rotations by 90/180/270 degrees: `none`; `classes` = each rotation is a new class (4x class pool
    of the splits in rotation_splits); `per_task` = a random rotation per class per task (MAML's code)."""
    rotation_splits: List[str] = field(default_factory=lambda: ["train", "val", "test"])
    """Which splits `rotation=classes` expands (per_task applies to the training sampler)."""
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
    bn_steps: int = 1
    """conv4_perstep (MAML++): rows of per-step BatchNorm weights, biases and running statistics; set to inner.steps."""


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
    lora_rank: int = 0
    """LoRA (Hu et al. 2021): 0 = adapt weights in full; r > 0 = adapt every selected weight with >= 2 dims
    (conv, linear) through a rank-r delta W + (lora_alpha / r) * B A (B zero-initialised per task);
    selected 1-dim tensors (biases, BatchNorm) still adapt in full. maml/fomaml/finetune only."""
    lora_alpha: float = 0.0
    """LoRA scale numerator: delta = (lora_alpha / lora_rank) * B A; 0 means lora_alpha = lora_rank (scale 1)."""
    checkpoint: bool = False
    """Activation checkpointing across inner steps (second order): each step's activations are recomputed
    in the outer backward instead of kept, so memory stays flat in inner.steps, for about one more support
    forward and backward per step; the same meta-gradient. maml/fomaml/boil/metasgd."""


@dataclass
class OuterConfig:
    algorithm: str = "maml"
    """`maml` (second order unless inner.first_order), `fomaml` (forces first order), `anil`, `boil`,
    `metasgd`, `mamlpp` (MAML++), `reptile`, `protonet` (see metalearn/algorithms/)."""
    lr: float = 1e-3
    """beta: Adam step size of the outer loop."""
    meta_batch_size: int = 32
    """Tasks per outer step."""
    iterations: int = 60000
    """Outer steps."""
    train: List[str] = field(default_factory=lambda: ["*"])
    """Name patterns of the parameters the outer loop trains; the rest stay frozen."""
    final_lr: Optional[float] = None
    """reptile: epsilon at the last step (annealed linearly from outer.lr; default 0, as OpenAI);
    mamlpp: the cosine schedule's minimum (default 0)."""
    lr_halve_every: int = 0
    """Halve the outer lr every N outer steps (0 = constant lr); ProtoNet's paper halves it every 2000
    episodes. Not for reptile and mamlpp, which anneal their own lr (outer.final_lr)."""
    msl_iterations: int = 0
    """mamlpp: outer steps over which the multi-step loss weights anneal to the final step (0 = final step only)."""
    first_order_until: int = 0
    """mamlpp: derivative-order annealing, first order for outer steps <= this (0 = second order throughout)."""
    execution: str = "auto"
    """How a meta-batch is adapted: `loop` = one task after another (the reference path); `batched` = all
    tasks at once, tasks as a batch dimension (grouped convolutions, batched matmuls; exact, see
    metalearn/inner/batched.py); `hybrid` = support sets batched, query sets one task at a time (the
    CPU's fastest for conv4); `auto` = batched on CUDA and for the MLP, hybrid for conv4 on a CPU,
    the loop where neither applies (the log says which)."""
    task_chunk: int = 0
    """batched/hybrid execution: adapt at most this many tasks at once, accumulating gradients (bounds
    memory; same result up to float rounding); 0 = the whole meta-batch (hybrid on CPU: chunks whose
    first-layer activations stay under 16 MB)."""


@dataclass
class EvalConfig:
    split: str = "test"
    """Class split evaluated at the end of training: train, val or test."""
    episodes: int = 600
    """Number of fixed, enumerated evaluation episodes."""
    seed: int = 0
    """Seed that fixes the evaluation episodes."""
    ways: Optional[int] = None
    """Defaults to data.ways."""
    shots: Optional[int] = None
    """Defaults to data.shots."""
    query_shots: int = 15
    """Query examples per class in evaluation episodes."""
    inner_steps: Optional[int] = None
    """Inner steps at test time; defaults to inner.steps."""
    inner_lr: Optional[float] = None
    """Inner lr at test time; defaults to inner.lr."""
    transductive: bool = True
    """BatchNorm at scoring time: true = the query set is one batch (its own statistics, MAML's setting);
    false = each query example is scored in a batch with the support set only (Reptile's non-transductive)."""
    batch_size: int = 50
    """Episodes adapted together (memory knob only; results do not depend on it)."""
    val_every: int = 0
    """Validate every N outer steps on `val_episodes` validation episodes (0 = never)."""
    val_episodes: int = 100


@dataclass
class PretrainConfig:
    steps: int = 2000
    """Supervised pre-training steps (mini-batches) on all meta-training classes jointly."""
    batch_size: int = 64
    """Images per mini-batch, drawn without replacement per epoch by a seeded generator."""
    optimizer: str = "adam"
    """`adam` or `sgd` (momentum 0.9)."""
    lr: float = 1e-3
    """Pre-training learning rate."""
    weight_decay: float = 0.0
    """Pre-training weight decay (L2, added to the gradient as torch.optim does)."""
    augment: List[str] = field(default_factory=list)
    """Augmentations of pre-training images: `crop` (pad image_size // 8 with zeros, random crop back),
    `flip` (random horizontal flip; not sensible for Omniglot characters)."""


@dataclass
class TransferConfig:
    """Transfer-learning baseline (outer.algorithm=finetune): supervised pre-training, then per test
    episode a fresh N-way head and fine-tuning of selected layers on the support set (Chen et al. 2019).
    Fine-tuning steps and lr are eval.inner_steps / eval.inner_lr (defaults inner.steps / inner.lr)."""
    init: str = "pretrain"
    """Where the fine-tuned weights come from: `pretrain` (supervised pre-training, transfer.pretrain.*),
    `maml` (meta-train MAML with this config's inner/outer settings first), or a checkpoint path."""
    blocks: int = 0
    """Body blocks fine-tuned besides the fresh head, counted from the top: 0 = head only, 4 = all of conv4."""
    head: str = "linear"
    """Classifier, in pre-training and in fine-tuning: `linear` (Baseline) or `cosine` (Baseline++:
    cosine_scale * cos(features, class weight))."""
    cosine_scale: float = 10.0
    """Temperature of the cosine head."""
    head_init: str = "random"
    """Fresh head per episode: `random` (nn.Linear's U(-1/sqrt(D), 1/sqrt(D)), seeded by a hash of the
    episode's support set, so it depends on nothing else), `zero` (linear head only) or `prototype`
    (class means of the support features; linear: W = 2 mean, b = -|mean|^2)."""
    head_seed: int = 0
    """Mixed into the per-episode seed of the random head."""
    optimizer: str = "sgd"
    """Fine-tuning update rule: `sgd` or `adam` (betas 0.9, 0.999; the differentiable rule of inner/rules.py)."""
    weight_decay: float = 0.0
    """Fine-tuning weight decay (L2 added to the gradient)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log to Weights & Biases (`import wandb` happens only when true)."""
    mode: str = "online"
    """`online`, `offline` (write locally, `wandb sync` later) or `disabled`; the WANDB_MODE variable wins if set."""
    project: str = "metalearn"
    """W&B project."""
    entity: str = ""
    """W&B user or team; empty = your default entity."""
    group: str = ""
    """Groups runs in the W&B UI (`metalearn ablate` sets it to the ablation's name)."""
    tags: List[str] = field(default_factory=list)
    """W&B tags of the run."""
    log_checkpoint: bool = True
    """Upload the final checkpoint as a `model` artifact."""


@dataclass
class TrackingConfig:
    out_dir: str = "runs"
    """Folder holding the run folders."""
    name: str = ""
    """Run folder name under out_dir; empty = <dataset>-<ways>w<shots>s-<timestamp>."""
    log_every: int = 10
    """Average the training metrics over this many outer steps per logged row."""
    progress: bool = True
    """Show a tqdm progress bar."""
    tensorboard: bool = False
    """Also write TensorBoard event files into <run folder>/tensorboard/ (scalars, the learning-curve figure,
    the evaluation result; `tensorboard --logdir runs`); needs the tensorboard package (pip install tensorboard)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Write checkpoint.pt every N outer steps (0 = only at the end); always written at the end and on SIGINT/SIGTERM."""


@dataclass
class Config:
    seed: int = 0
    """Seeds model initialisation and the training episode sampler (evaluation episodes use eval.seed)."""
    device: str = "cpu"
    """`cpu`, `cuda`, `cuda:N` or `auto`."""
    dtype: str = "float32"
    """`float32` or `float64` for parameters and images."""
    precision: str = "fp32"
    """Arithmetic of the meta-step (metalearn/precision.py): `fp32` (exact; turns TF32 off on CUDA), `tf32`
    (CUDA tensor cores) or `bf16` (autocast); evaluation always runs in `dtype`."""
    threads: int = 0
    """torch.set_num_threads; 0 leaves torch's default."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)


def _one_line(e: OmegaConfBaseException) -> str:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
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
            from .presets import resolve  # a path, or the name of a shipped preset

            p = resolve(path, "configs")
            try:
                loaded = OmegaConf.load(p)
            except Exception as e:  # YAML syntax errors
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise MetalearnError(f"config file {p} is not valid YAML: {first}") from None
            if not isinstance(loaded, DictConfig):  # e.g. a list at the top level
                raise MetalearnError(f"config file {p}: the top level must be a mapping of keys (data:, model:, ...), "
                                     f"not a {type(loaded).__name__.replace('Config', '').lower()}")
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


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
    """A copy of `cfg` with `key=value` overrides applied (unknown keys and wrong types are one-line errors),
    validated."""
    for ov in overrides:
        if "=" not in ov:
            raise MetalearnError(f"override {ov!r} is not of the form key=value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
        out: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise MetalearnError(f"config: {_one_line(e)}") from None
    validate(out)
    return out


def _positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise MetalearnError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float setting is a finite number (nan and inf pass OmegaConf's type check)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise MetalearnError(f"{prefix}{f.name} must be a finite number, got {value}")


def validate(cfg: Config) -> None:
    """Static checks that need no data; data-dependent checks happen when the data set is opened."""
    from .data import DATASETS, REGRESSION  # local import: data imports config's neighbours only
    from .models import MODELS

    _check_finite(cfg)

    if cfg.data.dataset not in DATASETS and cfg.data.dataset not in REGRESSION:
        known = ", ".join(sorted([*DATASETS, *REGRESSION]))
        raise MetalearnError(f"data.dataset: unknown data set {cfg.data.dataset!r}; known: {known}")
    if cfg.model.name not in MODELS:
        raise MetalearnError(f"model.name: unknown model {cfg.model.name!r}; known: {', '.join(sorted(MODELS))}")
    if cfg.model.batchnorm not in ("transductive", "none"):
        raise MetalearnError(f"model.batchnorm must be 'transductive' or 'none', got {cfg.model.batchnorm!r}")
    from .algorithms import ALGORITHMS

    if cfg.outer.algorithm not in ALGORITHMS:
        raise MetalearnError(f"outer.algorithm: unknown algorithm {cfg.outer.algorithm!r}; known: {', '.join(sorted(ALGORITHMS))}")
    for name, value in [("outer.msl_iterations", cfg.outer.msl_iterations),
                        ("outer.first_order_until", cfg.outer.first_order_until),
                        ("outer.lr_halve_every", cfg.outer.lr_halve_every),
                        ("outer.final_lr", cfg.outer.final_lr)]:
        _positive(name, value, allow_zero=True)
    if cfg.outer.lr_halve_every and cfg.outer.algorithm in ("reptile", "mamlpp", "finetune"):
        raise MetalearnError(f"outer.lr_halve_every: {cfg.outer.algorithm} has its own lr schedule; use 0")
    if cfg.outer.execution not in EXECUTIONS:
        raise MetalearnError(f"outer.execution must be auto, loop, batched or hybrid, got {cfg.outer.execution!r}")
    _positive("outer.task_chunk", cfg.outer.task_chunk, allow_zero=True)
    if cfg.data.dataset in REGRESSION:
        _validate_regression(cfg, REGRESSION[cfg.data.dataset])
    elif cfg.model.name == "mlp":
        raise MetalearnError(f"model.name=mlp takes 1-d inputs (data.dataset=sinusoid), not {cfg.data.dataset} images; use conv4")
    elif cfg.data.ways < 2:
        raise MetalearnError(f"data.ways must be >= 2, got {cfg.data.ways}")
    if cfg.data.rotation not in ("none", "classes", "per_task"):
        raise MetalearnError(f"data.rotation must be 'none', 'classes' or 'per_task', got {cfg.data.rotation!r}")
    if not set(cfg.data.rotation_splits) <= {"train", "val", "test"}:
        raise MetalearnError(f"data.rotation_splits: unknown split(s) {sorted(set(cfg.data.rotation_splits) - {'train', 'val', 'test'})}")
    if cfg.eval.ways is not None and cfg.eval.ways < 2 and cfg.data.dataset not in REGRESSION:
        raise MetalearnError(f"eval.ways must be >= 2, got {cfg.eval.ways}")
    for name, value in [
        ("data.shots", cfg.data.shots), ("data.query_shots", cfg.data.query_shots),
        ("data.image_size", cfg.data.image_size), ("model.hidden", cfg.model.hidden), ("model.bn_steps", cfg.model.bn_steps),
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
        ("checkpoint.every", cfg.checkpoint.every),
        ("threads", cfg.threads),
    ]:
        _positive(name, value, allow_zero=True)
    if cfg.data.dataset not in REGRESSION and cfg.model.name.startswith("conv4"):
        from .models.conv4 import flat_features  # four 2x max-pools: before any decoding or caching

        try:
            flat_features(cfg.model.hidden, cfg.data.image_size)
        except ValueError as e:
            raise MetalearnError(f"data.image_size: {e}") from None
    if cfg.dtype not in ("float32", "float64"):
        raise MetalearnError(f"dtype must be 'float32' or 'float64', got {cfg.dtype!r}")
    if cfg.precision not in PRECISIONS:
        raise MetalearnError(f"precision must be fp32, tf32 or bf16, got {cfg.precision!r}")
    if cfg.precision != "fp32" and cfg.dtype != "float32":
        raise MetalearnError(f"precision={cfg.precision} needs dtype=float32, got {cfg.dtype}")
    if cfg.eval.split not in ("train", "val", "test"):
        raise MetalearnError(f"eval.split must be train, val or test, got {cfg.eval.split!r}")
    if not cfg.inner.adapt:
        raise MetalearnError("inner.adapt is empty: name at least one parameter pattern (e.g. ['*'] or ['head.*'])")
    if not cfg.outer.train:
        raise MetalearnError("outer.train is empty: name at least one parameter pattern")
    if cfg.tracking.wandb.mode not in ("online", "offline", "disabled"):
        raise MetalearnError(f"tracking.wandb.mode must be online, offline or disabled, got {cfg.tracking.wandb.mode!r}")
    if "/" in cfg.tracking.name or cfg.tracking.name in (".", ".."):
        raise MetalearnError(f"tracking.name must be a plain folder name, got {cfg.tracking.name!r}")
    _validate_transfer(cfg)
    dev = cfg.device
    if not (dev in ("cpu", "auto", "cuda") or dev.startswith("cuda:")):
        raise MetalearnError(f"device must be cpu, cuda, cuda:N or auto, got {dev!r}")


def _validate_regression(cfg: Config, protocols: Any) -> None:
    """data.dataset=sinusoid: 1-d regression with an MLP, one output, MSE."""
    d = cfg.data
    if cfg.model.name != "mlp":
        raise MetalearnError(f"model.name={cfg.model.name} cannot take {d.dataset} inputs (1-d x): use model.name=mlp")
    if d.ways != 1 or (cfg.eval.ways is not None and cfg.eval.ways != 1):
        raise MetalearnError(f"data.ways (and eval.ways) must be 1 for {d.dataset} regression (one output), got "
                             f"{d.ways if d.ways != 1 else cfg.eval.ways}")
    if d.split not in protocols:
        raise MetalearnError(f"data.split: {d.dataset} protocols are {', '.join(protocols)}, got {d.split!r}")
    if d.rotation != "none":
        raise MetalearnError(f"data.rotation={d.rotation} does not apply to {d.dataset} regression; use none")
    if cfg.outer.algorithm in ("protonet", "finetune"):
        raise MetalearnError(f"outer.algorithm={cfg.outer.algorithm} is for classification, not {d.dataset} regression")


def _validate_transfer(cfg: Config) -> None:
    """inner.lora_* and transfer.* (the transfer-learning baseline, metalearn/transfer/)."""
    t, p = cfg.transfer, cfg.transfer.pretrain
    _positive("inner.lora_rank", cfg.inner.lora_rank, allow_zero=True)
    _positive("inner.lora_alpha", cfg.inner.lora_alpha, allow_zero=True)
    if cfg.inner.lora_rank and cfg.outer.algorithm not in ("maml", "fomaml", "finetune"):
        raise MetalearnError(f"inner.lora_rank: LoRA adaptation is available for maml, fomaml and finetune, "
                             f"not {cfg.outer.algorithm!r}")
    _positive("transfer.blocks", t.blocks, allow_zero=True)
    if t.head not in ("linear", "cosine"):
        raise MetalearnError(f"transfer.head must be 'linear' or 'cosine', got {t.head!r}")
    _positive("transfer.cosine_scale", t.cosine_scale)
    if t.head_init not in ("random", "zero", "prototype"):
        raise MetalearnError(f"transfer.head_init must be random, zero or prototype, got {t.head_init!r}")
    if t.head_init == "zero" and t.head == "cosine":
        raise MetalearnError("transfer.head_init=zero needs transfer.head=linear (a cosine head has no direction at zero)")
    if t.optimizer not in ("sgd", "adam"):
        raise MetalearnError(f"transfer.optimizer must be 'sgd' or 'adam', got {t.optimizer!r}")
    _positive("transfer.weight_decay", t.weight_decay, allow_zero=True)
    if not t.init:
        raise MetalearnError("transfer.init is empty: use pretrain, maml or a checkpoint path")
    for name, value in [("transfer.pretrain.steps", p.steps), ("transfer.pretrain.batch_size", p.batch_size),
                        ("transfer.pretrain.lr", p.lr)]:
        _positive(name, value)
    _positive("transfer.pretrain.weight_decay", p.weight_decay, allow_zero=True)
    if p.optimizer not in ("sgd", "adam"):
        raise MetalearnError(f"transfer.pretrain.optimizer must be 'sgd' or 'adam', got {p.optimizer!r}")
    bad = sorted(set(p.augment) - {"crop", "flip"})
    if bad:
        raise MetalearnError(f"transfer.pretrain.augment: unknown augmentation {bad[0]!r}; known: crop, flip")
