"""Typed, documented configuration.

A run is described by one `Config`: dataclasses with defaults, merged (by OmegaConf structured
configs) from a YAML preset and then `key=value` overrides. Presets only override defaults. Unknown
keys and values of the wrong type are errors that name the key. Every field is documented by the
string under it (`metalearn config` prints them).

Choices. A field with a fixed set of values is typed by an enum (`Choice`, a `str` subclass; see
`Execution`, `Precision`, ...): YAML files and overrides give the plain string, any other value is
refused by the type itself with one line listing the choices, a value compares equal to its string
(`cfg.outer.execution == "loop"`), formats and prints as it, and `to_dict` (checkpoints) and
config.yaml hold plain strings. Names that come from a registry (data.dataset, model.name,
outer.algorithm) stay `str` and are checked against that registry.

Validation, in two layers (config.py imports nothing above the foundation layer):

* `check_static(cfg)`, here: ranges, finite numbers, choices, combinations of fields; no registry.
* metalearn/validation.py (layer "train"): the checks that need the registries of data sets, models
  and algorithms (and the algorithms' declared capabilities); `validation.validate(cfg)` runs
  `check_static`, then those.

`validate(cfg)` here runs `check_static`, then every validator registered with
`register_validator`. metalearn/validation.py registers its registry checks when it is imported, and
metalearn/__init__.py imports it, so any use of the package (`import metalearn.config` runs
metalearn/__init__.py first) has them installed: `load_config`, `apply_overrides` and `validate`
refuse an unknown algorithm, model or data set without config.py importing upward.

Moved keys. Algorithm-specific settings live in their algorithm's section (`reptile.*`, `mamlpp.*`).
A YAML file or override that uses an old key (`outer.final_lr`, `outer.msl_iterations`,
`outer.first_order_until`) is a one-line error naming the new key. A config saved by an earlier
version still loads: `from_dict` (a checkpoint's config) and `load_config` of a run's whole
config.yaml (`metalearn train RUN --resume`) map the old keys to the new ones, for the algorithm
they applied to, and the old default `inner.adapt: ['*']` to `null` (the algorithm's default).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import MetalearnError


class Choice(str, Enum):
    """One of a fixed set of strings: equal to (and hashed, printed, formatted as) its plain string.
    Members are named as their values (OmegaConf parses a YAML or command-line string by name)."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:
        return hash(self.value)

    @classmethod
    def values(cls) -> "tuple[str, ...]":
        return tuple(m.value for m in cls)


class Rotation(Choice):
    none = "none"
    classes = "classes"
    per_task = "per_task"


class Split(Choice):
    train = "train"
    val = "val"
    test = "test"


class BatchNorm(Choice):
    transductive = "transductive"
    none = "none"


class Execution(Choice):
    auto = "auto"
    loop = "loop"
    batched = "batched"
    hybrid = "hybrid"


class Dtype(Choice):
    float32 = "float32"
    float64 = "float64"


class Precision(Choice):
    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Head(Choice):
    linear = "linear"
    cosine = "cosine"


class HeadInit(Choice):
    random = "random"
    zero = "zero"
    prototype = "prototype"


class Optimizer(Choice):
    sgd = "sgd"
    adam = "adam"


class Augment(Choice):
    """The augmentations of metalearn/data/augment.py (its registry order is the order they run in)."""
    crop = "crop"
    flip = "flip"
    rotate = "rotate"
    jitter = "jitter"
    erase = "erase"


class EpisodeSet(Choice):
    support = "support"
    query = "query"


EXECUTIONS = Execution.values()  # outer.execution (metalearn/algorithms/base.py)
PRECISIONS = Precision.values()  # precision (metalearn/precision.py)


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
    rotation: Rotation = Rotation.none
    """Rotations by 90/180/270 degrees: `none`; `classes` = each rotation is a new class (4x class pool
    of the splits in rotation_splits); `per_task` = a random rotation per class per task (MAML's code)."""
    rotation_splits: List[Split] = field(default_factory=lambda: [Split.train, Split.val, Split.test])
    """Which splits (`train`, `val`, `test`) `rotation=classes` expands (per_task applies to the training sampler)."""
    image_size: int = 28
    ways: int = 5
    """N: classes per task."""
    shots: int = 1
    """K: labelled support examples per class."""
    query_shots: int = 15
    """Q: query examples per class, used for the outer loss and for scoring."""
    augment: List[Augment] = field(default_factory=list)
    """Augmentations of meta-training episodes, per image, seeded (metalearn/data/augment.py): `crop`, `flip`,
    `rotate` (+-15 degrees), `jitter` (brightness, contrast), `erase` (a random rectangle set to 0); they run
    in that order whatever the list's order. Validation and test episodes are never augmented."""
    augment_sets: List[EpisodeSet] = field(default_factory=lambda: [EpisodeSet.support, EpisodeSet.query])
    """Which sets of a meta-training episode data.augment applies to: `support`, `query`."""


@dataclass
class ModelConfig:
    name: str = "conv4"
    """Model (see `metalearn list`): `conv4` (4 conv blocks and a linear head), `conv4_perstep` (conv4 with
    MAML++'s per-step BatchNorm), `mlp` (sinusoid regression), `resnet12` (MetaOptNet/FEAT; options in
    model.kwargs), or your own torch.nn.Module subclass as `module.path:ClassName` (README "Your own model")."""
    hidden: int = 64
    """Filters per conv layer (conv4) or hidden units (mlp); not used by resnet12 or your own model."""
    batchnorm: BatchNorm = BatchNorm.transductive
    """`transductive`: BatchNorm always uses the current batch's statistics (MAML's setting); `none`: no BatchNorm."""
    bn_steps: int = 1
    """conv4_perstep (MAML++): rows of per-step BatchNorm weights, biases and running statistics; set to inner.steps."""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the model's constructor (e.g. ResNet-12's options, or your own model's)."""


@dataclass
class InnerConfig:
    lr: float = 0.4
    """alpha: inner-loop SGD step size."""
    steps: int = 1
    """Inner-loop SGD steps on the support set during meta-training."""
    first_order: bool = False
    """Drop second-order terms of the meta-gradient (FOMAML)."""
    adapt: Optional[List[str]] = None
    """Name patterns (fnmatch) of the parameters the inner loop adapts; null = the algorithm's default (its
    class's `default_adapt`: every parameter, but the head for anil and the body for boil); ['*'] = every
    parameter, ['head.*'] = the head only (ANIL-style)."""
    lora_rank: int = 0
    """LoRA (Hu et al. 2021): 0 = adapt weights in full; r > 0 = adapt every selected weight with >= 2 dims
    (conv, linear) through a rank-r delta W + (lora_alpha / r) * B A (B zero-initialised per task);
    selected 1-dim tensors (biases, BatchNorm) still adapt in full. For algorithms that declare the `lora`
    capability (today maml, fomaml, finetune)."""
    lora_alpha: float = 0.0
    """LoRA scale numerator: delta = (lora_alpha / lora_rank) * B A; 0 means lora_alpha = lora_rank (scale 1)."""
    checkpoint: bool = False
    """Activation checkpointing across inner steps (second order): each step's activations are recomputed
    in the outer backward instead of kept, so memory stays flat in inner.steps, for about one more support
    forward and backward per step; the same meta-gradient. For algorithms that declare the `inner_checkpoint`
    capability (today maml, fomaml, boil, metasgd)."""


@dataclass
class OuterConfig:
    algorithm: str = "maml"
    """`maml` (second order unless inner.first_order), `fomaml` (forces first order), `anil`, `boil`,
    `metasgd`, `mamlpp` (MAML++, settings in mamlpp.*), `reptile` (settings in reptile.*), `protonet`,
    `imaml` (imaml.*), `r2d2` (r2d2.*), `cavia` (cavia.*), `finetune` (the transfer baseline, transfer.*);
    the algorithm registry, metalearn/algorithms/."""
    lr: float = 1e-3
    """beta: Adam step size of the outer loop."""
    meta_batch_size: int = 32
    """Tasks per outer step."""
    iterations: int = 60000
    """Outer steps."""
    train: List[str] = field(default_factory=lambda: ["*"])
    """Name patterns of the parameters the outer loop trains; the rest stay frozen."""
    lr_halve_every: int = 0
    """Halve the outer lr every N outer steps (0 = constant lr); ProtoNet's paper halves it every 2000
    episodes. Not for algorithms that anneal their own lr (capability own_lr_schedule: reptile, see
    reptile.final_lr; mamlpp, see mamlpp.final_lr; finetune)."""
    execution: Execution = Execution.auto
    """How a meta-batch is adapted: `loop` = one task after another (the reference path); `batched` = all
    tasks at once, tasks as a batch dimension (grouped convolutions, batched matmuls; exact, see
    metalearn/inner/batched.py); `hybrid` = support sets batched, query sets one task at a time (the
    CPU's fastest for conv4); `auto` = batched on CUDA (hybrid there for models of 1M parameters or
    more, like ResNet-12) and for the MLP, hybrid for image models on a CPU, the loop where neither
    applies (the log says which)."""
    task_chunk: int = 0
    """batched/hybrid execution: adapt at most this many tasks at once, accumulating gradients (bounds
    memory; same result up to float rounding); 0 = the whole meta-batch (hybrid on CPU: chunks whose
    first-layer activations stay under 16 MB)."""
    compile: bool = False
    """Compile the meta-step with torch.compile (opt-in; minutes of compilation, cached); refused where
    the compiled meta-gradient does not match the eager one (metalearn/compiled.py)."""


@dataclass
class ReptileConfig:
    """Reptile (outer.algorithm=reptile, Nichol et al. 2018): outer step size epsilon = outer.lr, annealed
    linearly to final_lr at the last outer step (OpenAI's meta_step_size_final)."""
    final_lr: float = 0.0
    """Epsilon at the last outer step (annealed linearly from outer.lr; 0 as OpenAI's code)."""
    inner_batch_size: int = 0
    """Meta-training's inner mini-batch (OpenAI's --inner-batch): each inner step takes the next
    inner_batch_size examples of a stream of random permutations of the support set, so the steps see
    different examples; 0 = every step on the whole support set. Evaluation always uses the whole set."""


@dataclass
class MAMLPPConfig:
    """MAML++ (outer.algorithm=mamlpp, Antoniou et al. 2019): multi-step loss, derivative-order annealing,
    a cosine outer lr from outer.lr down to final_lr (model.name=conv4_perstep for per-step BatchNorm)."""
    final_lr: float = 0.0
    """Minimum of the cosine outer-lr schedule, reached at the last outer step."""
    msl_iterations: int = 0
    """Outer steps over which the multi-step loss weights anneal to the final step (0 = final step only)."""
    first_order_until: int = 0
    """Derivative-order annealing: first order for outer steps <= this (0 = second order throughout)."""


@dataclass
class IMAMLConfig:
    """Implicit MAML (outer.algorithm=imaml, Rajeswaran et al. 2019): the inner problem adds a proximal term
    lam/2 ||phi - theta||^2 (solved by inner.steps steps of gradient descent of inner.lr, first order) and the
    meta-gradient comes from the implicit function theorem, (I + H / lam)^{-1} grad L_query(phi) with H the
    support loss's Hessian, solved by conjugate gradient on Hessian-vector products
    (metalearn/algorithms/imaml.py). inner.first_order does not apply."""
    lam: float = 2.0
    """Proximal regularisation strength lambda (> 0; inner.lr * lam < 2, or the inner descent diverges); 2.0 is the
    paper's value for Omniglot."""
    cg_steps: int = 5
    """Conjugate-gradient iterations (>= 1) for (I + H / lam) g = grad L_query(phi); safeguarded for an
    indefinite system (the iterate with the smallest residual is used)."""
    cg_damping: float = 0.0
    """Added to the diagonal of the CG system ((1 + damping) I + H / lam) for stability; 0 = none (the paper's)."""


class RidgeHead(Choice):
    r2d2 = "r2d2"
    metaoptnet_rr = "metaoptnet_rr"


@dataclass
class R2D2Config:
    """Differentiable closed-form ridge-regression head (outer.algorithm=r2d2, Bertinetto et al. 2019; MetaOptNet-RR,
    Lee et al. 2019): per task W = argmin ||Z_s W - Y||^2 + lam ||W||^2 on the body's support features, query
    logits = alpha * Z_q W + beta (metalearn/algorithms/r2d2.py). MetaOptNet-RR's own settings: head=metaoptnet_rr
    lam=50 learn_lam=false scale=2."""
    head: RidgeHead = RidgeHead.r2d2
    """`r2d2` (Bertinetto's code): Z_s gets a column of ones (a per-class bias, penalised like the weights), lam is
    per support example (the system uses n * lam, n = ways * shots) and beta is learned; `metaoptnet_rr` (Lee et
    al.'s ridge head): plain Z_s, lam as given, no beta."""
    lam: float = 1.0
    """Initial ridge penalty lambda (> 0; learned in log space when learn_lam)."""
    learn_lam: bool = True
    """Meta-learn lambda together with the backbone (false: lambda stays at `lam`)."""
    scale: float = 1.0
    """Initial output scale alpha (learned), logits = alpha * Z_q W + beta."""


@dataclass
class CAVIAConfig:
    """CAVIA (outer.algorithm=cavia, Zintgraf et al. 2019): only context parameters, reset to zero per task,
    adapt in the inner loop (inner.lr, inner.steps); they enter the network by FiLM or concatenation, through
    a layer trained with the model (metalearn/algorithms/cavia.py)."""
    context_dim: int = 100
    """Number of context parameters (the paper's code: 100 for mini-ImageNet, 5 for the sinusoid)."""
    film: bool = True
    """conv4: true = FiLM (a per-channel scale and shift computed from the context) in conv block film_block,
    false = the context concatenated to the flattened features before the head. mlp (sinusoid): does not
    apply; the context is always concatenated to the input, as in the paper's regression network."""
    film_block: int = 2
    """conv4 with film: the conv block (0-3) whose output, after BatchNorm and max-pooling and before the
    ReLU, the FiLM layer scales and shifts (the paper's code: the third block, 2)."""


@dataclass
class EvalConfig:
    split: Split = Split.test
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
    optimizer: Optimizer = Optimizer.adam
    """`adam` or `sgd` (momentum 0.9)."""
    lr: float = 1e-3
    """Pre-training learning rate."""
    weight_decay: float = 0.0
    """Pre-training weight decay (L2, added to the gradient as torch.optim does)."""
    augment: List[Augment] = field(default_factory=list)
    """Augmentations of pre-training images: `crop` (pad image_size // 8 with zeros, random crop back),
    `flip` (random horizontal flip; not sensible for Omniglot characters), `rotate`, `jitter`, `erase`
    (as data.augment, metalearn/data/augment.py)."""


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
    head: Head = Head.linear
    """Classifier, in pre-training and in fine-tuning: `linear` (Baseline) or `cosine` (Baseline++:
    cosine_scale * cos(features, class weight))."""
    cosine_scale: float = 10.0
    """Temperature of the cosine head."""
    head_init: HeadInit = HeadInit.random
    """Fresh head per episode: `random` (nn.Linear's U(-1/sqrt(D), 1/sqrt(D)), seeded by a hash of the
    episode's support set, so it depends on nothing else), `zero` (linear head only) or `prototype`
    (class means of the support features; linear: W = 2 mean, b = -|mean|^2)."""
    head_seed: int = 0
    """Mixed into the per-episode seed of the random head."""
    optimizer: Optimizer = Optimizer.sgd
    """Fine-tuning update rule: `sgd` or `adam` (betas 0.9, 0.999; the differentiable rule of inner/rules.py)."""
    weight_decay: float = 0.0
    """Fine-tuning weight decay (L2 added to the gradient)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log to Weights & Biases (`import wandb` happens only when true)."""
    mode: WandbMode = WandbMode.online
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
    """Write checkpoint.pt every N outer steps (0 = only at the end); always written at the end and on
    SIGINT/SIGTERM."""


@dataclass
class Config:
    seed: int = 0
    """Seeds model initialisation and the training episode sampler (evaluation episodes use eval.seed)."""
    device: str = "cpu"
    """`cpu`, `cuda`, `cuda:N` or `auto`."""
    dtype: Dtype = Dtype.float32
    """`float32` or `float64` for parameters and images."""
    precision: Precision = Precision.fp32
    """Arithmetic of the meta-step (metalearn/precision.py): `fp32` (exact; turns TF32 off on CUDA), `tf32`
    (CUDA tensor cores) or `bf16` (autocast); evaluation always runs in `dtype`."""
    threads: int = 0
    """torch.set_num_threads; 0 leaves torch's default."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    reptile: ReptileConfig = field(default_factory=ReptileConfig)
    mamlpp: MAMLPPConfig = field(default_factory=MAMLPPConfig)
    imaml: IMAMLConfig = field(default_factory=IMAMLConfig)
    r2d2: R2D2Config = field(default_factory=R2D2Config)
    cavia: CAVIAConfig = field(default_factory=CAVIAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)


MOVED: Dict[str, str] = {
    "outer.final_lr": "reptile.final_lr (Reptile's final epsilon) or mamlpp.final_lr (MAML++'s cosine minimum)",
    "outer.msl_iterations": "mamlpp.msl_iterations",
    "outer.first_order_until": "mamlpp.first_order_until",
}
"""Keys that moved to an algorithm's section -> where they are now (see the module docstring)."""


def check_moved(keys: Iterable[str], where: str = "config") -> None:
    """A one-line error if any of the dotted `keys` is a key that moved (MOVED), naming its new place."""
    for key in keys:
        key = key.strip().lstrip("+~")
        if key in MOVED:
            raise MetalearnError(f"{where}: {key} has moved: use {MOVED[key]}")


def _dotted_keys(node: Any, prefix: str = "") -> List[str]:
    """The dotted leaf keys of a nested mapping (a loaded YAML file, an ablation's values)."""
    out: List[str] = []
    for k, v in (node.items() if hasattr(node, "items") else []):
        key = f"{prefix}{k}"
        out += _dotted_keys(v, f"{key}.") if isinstance(v, (dict, DictConfig)) else [key]
    return out


def _one_line(e: OmegaConfBaseException) -> str:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    key = getattr(e, "full_key", None)
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return msg


def load_config(path: str | Path | None = None, overrides: List[str] | None = None) -> Config:
    """Defaults <- YAML preset at `path` <- `key=value` overrides, then validated (`validate`: the static
    checks and the registries' checks)."""
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
            if _saved_by_earlier_version(loaded):  # a run's config.yaml (e.g. --resume of an older run)
                loaded = OmegaConf.create(_upgrade(OmegaConf.to_container(loaded)))
            check_moved(_dotted_keys(loaded), f"config file {p}")
            layers.append(loaded)
        _check_overrides(overrides or [])
        if overrides:
            layers.append(_dotlist(overrides))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise MetalearnError(f"config: {_one_line(e)}") from None
    validate(cfg)
    return cfg


def _check_overrides(overrides: List[str]) -> None:
    for ov in overrides:
        if "=" not in ov:
            raise MetalearnError(f"override {ov!r} is not of the form key=value")
    check_moved(ov.split("=", 1)[0] for ov in overrides)


def _dotlist(overrides: List[str]) -> DictConfig:
    """`key=value` overrides as a DictConfig; a value that is not valid YAML (e.g. `[*]`: quote it, `['*']`)
    is a one-line error naming the override."""
    for ov in overrides:
        try:
            OmegaConf.from_dotlist([ov])
        except yaml.YAMLError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MetalearnError(f"override {ov!r}: the value is not valid YAML ({first}); quote it, "
                                 f"e.g. key='value' or key=['*']") from None
    return OmegaConf.from_dotlist(list(overrides))


def _plain(value: Any) -> Any:
    """Choices -> their plain strings, in nested dicts and lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested dicts of plain values (choices as plain strings): what checkpoints store."""
    return _plain(dataclasses.asdict(cfg))


_SAVED_SECTIONS = {"data", "model", "inner", "outer", "eval", "tracking"}


def _saved_by_earlier_version(loaded: DictConfig) -> bool:
    """A whole resolved config written by an earlier version (a run's config.yaml): every section, and an
    `outer` with the algorithm and every moved key, as `to_dict`/config.yaml always wrote them; a preset
    that uses a moved key is not one (it gets the error naming the new key)."""
    outer = loaded.get("outer")
    return (_SAVED_SECTIONS <= set(loaded) and isinstance(outer, DictConfig)
            and {"algorithm", *(k.split(".", 1)[1] for k in MOVED)} <= set(outer))


def _upgrade(d: Any) -> Any:
    """A config dict saved by an earlier version (its `outer` holds a moved key) in today's keys: the moved
    keys go to the section of the algorithm they applied to (dropped for others, where they did nothing),
    and inner.adapt ['*'], then the default that meant "the algorithm's default", becomes null."""
    outer = d.get("outer") if isinstance(d, dict) else None
    if not isinstance(outer, dict) or not any(k.split(".", 1)[1] in outer for k in MOVED):
        return d
    d = copy.deepcopy(d)
    outer = d["outer"]
    old = {k: outer.pop(k) for k in ("final_lr", "msl_iterations", "first_order_until") if k in outer}
    if old.get("final_lr") is None:  # null meant 0 for both
        old.pop("final_lr", None)
    algorithm = outer.get("algorithm", "maml")
    if algorithm == "reptile" and "final_lr" in old:
        d.setdefault("reptile", {})["final_lr"] = old["final_lr"]
    elif algorithm == "mamlpp":
        d.setdefault("mamlpp", {}).update(old)
    inner = d.get("inner")
    if isinstance(inner, dict) and list(inner.get("adapt") or []) == ["*"]:
        inner["adapt"] = None
    return d


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict` (e.g. from a checkpoint) or a run's config.yaml, also one saved
    by an earlier version (moved keys are mapped, see `_upgrade`)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(_upgrade(d))))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise MetalearnError(f"saved config: {_one_line(e)}") from None


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
    """A copy of `cfg` with `key=value` overrides applied (unknown keys and wrong types are one-line errors),
    validated."""
    _check_overrides(overrides)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), _dotlist(overrides))
        out: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise MetalearnError(f"config: {_one_line(e)}") from None
    validate(out)
    return out


def eval_settings(cfg: Config) -> Dict[str, Any]:
    """The evaluation protocol with its defaults filled in from training: {ways, shots, query_shots,
    inner_steps, inner_lr} (eval.ways <- data.ways, eval.shots <- data.shots, eval.inner_steps <-
    inner.steps, eval.inner_lr <- inner.lr)."""
    return dict(ways=cfg.eval.ways or cfg.data.ways, shots=cfg.eval.shots or cfg.data.shots,
                query_shots=cfg.eval.query_shots,
                inner_steps=cfg.inner.steps if cfg.eval.inner_steps is None else cfg.eval.inner_steps,
                inner_lr=cfg.inner.lr if cfg.eval.inner_lr is None else cfg.eval.inner_lr)


# --- validation -------------------------------------------------------------------------------------

_VALIDATORS: List[Callable[[Config], None]] = []
"""Checks run by `validate` after the static ones (metalearn/validation.py registers the registries')."""


def register_validator(fn: Callable[[Config], None]) -> Callable[[Config], None]:
    """Have `validate` (and so `load_config`, `apply_overrides`) also run `fn(cfg)`, which raises a
    MetalearnError; registering the same function twice has no effect."""
    if fn not in _VALIDATORS:
        _VALIDATORS.append(fn)
    return fn


def validate(cfg: Config) -> None:
    """Every check of a config: `check_static`, then the registered validators (the data set, model and
    algorithm registries' checks of metalearn/validation.py, installed by importing metalearn)."""
    check_static(cfg)
    for fn in _VALIDATORS:
        fn(cfg)


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


def _choice_type(hint: Any) -> Optional[type]:
    """The Choice enum of a field typed X, List[X] or Optional[...] of them, else None."""
    if isinstance(hint, type) and issubclass(hint, Choice):
        return hint
    for arg in typing.get_args(hint):
        found = _choice_type(arg)
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_choices(node: Any, prefix: str = "") -> None:
    """Every choice field holds one of its choices, also when set by assignment (`cfg.precision = "half"`),
    which OmegaConf does not see; the message is OmegaConf's for a bad YAML value or override."""
    hints = _hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
            continue
        choice = _choice_type(hints[f.name])
        if choice is None or value is None:
            continue
        for i, v in (enumerate(value) if isinstance(value, list) else [(None, value)]):
            try:
                choice(v)
            except ValueError:
                where = f"{prefix}{f.name}" + ("" if i is None else f"[{i}]")
                raise MetalearnError(f"{where}: Invalid value {v!r}, "
                                     f"expected one of [{', '.join(choice.values())}]") from None


def check_static(cfg: Config) -> None:
    """The checks that need no registry and no data: ranges, finite numbers, choices, combinations.
    Data-dependent checks happen when the data set is opened."""
    _check_finite(cfg)
    _check_choices(cfg)
    for name, value in [("mamlpp.msl_iterations", cfg.mamlpp.msl_iterations),
                        ("mamlpp.first_order_until", cfg.mamlpp.first_order_until),
                        ("mamlpp.final_lr", cfg.mamlpp.final_lr), ("reptile.final_lr", cfg.reptile.final_lr),
                        ("reptile.inner_batch_size", cfg.reptile.inner_batch_size),
                        ("outer.lr_halve_every", cfg.outer.lr_halve_every)]:
        _positive(name, value, allow_zero=True)
    _positive("outer.task_chunk", cfg.outer.task_chunk, allow_zero=True)
    for name, value in [
        ("data.shots", cfg.data.shots), ("data.query_shots", cfg.data.query_shots),
        ("data.image_size", cfg.data.image_size), ("model.hidden", cfg.model.hidden),
        ("model.bn_steps", cfg.model.bn_steps),
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
    if cfg.precision != "fp32" and cfg.dtype != "float32":
        raise MetalearnError(f"precision={cfg.precision} needs dtype=float32, got {cfg.dtype}")
    if cfg.inner.adapt is not None and not cfg.inner.adapt:
        raise MetalearnError("inner.adapt is empty: name at least one parameter pattern (e.g. ['*'] or ['head.*']), "
                             "or null for the algorithm's default")
    if not cfg.outer.train:
        raise MetalearnError("outer.train is empty: name at least one parameter pattern")
    if "/" in cfg.tracking.name or cfg.tracking.name in (".", ".."):
        raise MetalearnError(f"tracking.name must be a plain folder name, got {cfg.tracking.name!r}")
    _check_transfer(cfg)
    if cfg.data.augment and not cfg.data.augment_sets:
        raise MetalearnError("data.augment is set but data.augment_sets is empty: name support, query or both")
    dev = cfg.device
    if not (dev in ("cpu", "auto", "cuda") or dev.startswith("cuda:")):
        raise MetalearnError(f"device must be cpu, cuda, cuda:N or auto, got {dev!r}")


def _check_transfer(cfg: Config) -> None:
    """inner.lora_* and transfer.* (the transfer-learning baseline, metalearn/transfer/)."""
    t, p = cfg.transfer, cfg.transfer.pretrain
    _positive("inner.lora_rank", cfg.inner.lora_rank, allow_zero=True)
    _positive("inner.lora_alpha", cfg.inner.lora_alpha, allow_zero=True)
    _positive("transfer.blocks", t.blocks, allow_zero=True)
    _positive("transfer.cosine_scale", t.cosine_scale)
    if t.head_init == "zero" and t.head == "cosine":
        raise MetalearnError("transfer.head_init=zero needs transfer.head=linear "
                             "(a cosine head has no direction at zero)")
    _positive("transfer.weight_decay", t.weight_decay, allow_zero=True)
    if not t.init:
        raise MetalearnError("transfer.init is empty: use pretrain, maml or a checkpoint path")
    for name, value in [("transfer.pretrain.steps", p.steps), ("transfer.pretrain.batch_size", p.batch_size),
                        ("transfer.pretrain.lr", p.lr)]:
        _positive(name, value)
    _positive("transfer.pretrain.weight_decay", p.weight_decay, allow_zero=True)
