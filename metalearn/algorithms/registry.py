"""The algorithm registry: `outer.algorithm` names -> classes, and what each algorithm declares it can do.

An algorithm file registers its class with `@register("maml")`; the class declares

    capabilities   a `Capabilities` (below): what the engine, the training loop, torchrun and the
                   CLI may do with it. Nothing outside metalearn/algorithms/ branches on an
                   algorithm's name: they ask `capabilities(name)`.
    from_config    classmethod (cfg, model, loss) -> the algorithm, configured from a Config.

`build(cfg, model, loss)` is what the training loop and `metalearn eval` call.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Type

from ..errors import MetalearnError


@dataclass(frozen=True)
class Capabilities:
    """What an algorithm supports, declared in its file (defaults: a plain meta-learner)."""

    inner_loop: bool = True
    """Adapts by inner gradient steps (False: ProtoNet, whose results print no inner steps)."""
    meta_trained: bool = True
    """Has a meta_step (False: the transfer baseline, which is pre-trained and only evaluated)."""
    batchable: bool = False
    """The engine may adapt all tasks of a meta-batch at once (execution=batched) on a supported model."""
    hybrid: bool = False
    """The engine may batch the support sets and score the query sets per task (execution=hybrid)."""
    shardable: bool = True
    """A meta-batch may be split across torchrun processes (the tasks of a batch are independent)."""
    test_ways_may_differ: bool = False
    """eval.ways may differ from data.ways (no fixed-size head: ProtoNet, fine-tuning's fresh head)."""
    lora: bool = False
    """inner.lora_rank: the inner loop may adapt LoRA deltas instead of whole weights."""
    inner_checkpoint: bool = False
    """inner.checkpoint: the inner loop may recompute its activations in the outer backward."""
    compile: bool = False
    """outer.compile: the meta-step may run as one torch.compile'd torch.func function (metalearn/compiled.py)."""
    own_lr_schedule: bool = False
    """Anneals its own outer lr (reptile, mamlpp): outer.lr_halve_every does not apply."""
    learns_inner_lr: bool = False
    """Its inner lrs are learned (metasgd, mamlpp): eval.inner_lr does not apply."""
    regression: bool = True
    """Works with a regression loss (sinusoid, MSE); False for classifiers (prototypes, a fresh N-way head)."""


ALGORITHMS: Dict[str, Type[Any]] = {}
"""outer.algorithm -> class (filled by the @register decorators of metalearn/algorithms/*.py)."""


def register(name: str) -> Callable[[Type[Any]], Type[Any]]:
    """Class decorator: make `cls` the algorithm `outer.algorithm=name` builds (cls.from_config)."""
    def add(cls: Type[Any]) -> Type[Any]:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is registered twice ({ALGORITHMS[name].__name__}, {cls.__name__})")
        if not isinstance(getattr(cls, "capabilities", None), Capabilities):
            raise TypeError(f"{cls.__name__}: declare `capabilities = Capabilities(...)`")
        ALGORITHMS[name] = cls
        return cls
    return add


def get(name: str) -> Type[Any]:
    """The class registered as `name`, or a one-line error listing the known names."""
    if name not in ALGORITHMS:
        raise MetalearnError(f"outer.algorithm: unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


def capabilities(name: str) -> Capabilities:
    """What the algorithm `name` declares it supports."""
    return get(name).capabilities


def supporting(flag: str) -> "list[str]":
    """The registered algorithm names whose capabilities have `flag` set (for error messages)."""
    if flag not in {f.name for f in fields(Capabilities)}:
        raise KeyError(flag)
    return sorted(n for n, cls in ALGORITHMS.items() if getattr(cls.capabilities, flag))


def build(cfg: Any, model: Any, *, loss: str = "cross_entropy") -> Any:
    """The algorithm named by cfg.outer.algorithm on `model`, configured from `cfg`."""
    return get(cfg.outer.algorithm).from_config(cfg, model, loss=loss)


__all__ = ["ALGORITHMS", "Capabilities", "build", "capabilities", "get", "register", "supporting"]
