"""Models by name: the shipped ones (MODELS) or your own by import path.

model.name is a key of MODELS (conv4, conv4_perstep, mlp, resnet12), or `module.path:ClassName`: a subclass of
torch.nn.Module that metalearn imports and builds (the README's "Your own model"). Anything else behind an
import path (a function, `subprocess:run`) is refused before it is called: a checkpoint's config names its
model and `metalearn eval` rebuilds it from there.

Constructor arguments. A shipped model gets (in_channels, num_classes, hidden, image_size, batchnorm; and
conv4_perstep's steps) from the data set and model.*, plus model.kwargs. Your own model gets in_channels (the
data set's image channels), num_classes (data.ways; 1 for regression) and image_size (data.image_size) when its
constructor names them (all three when it takes **kwargs), plus model.kwargs; model.hidden, model.batchnorm and
model.bn_steps are not passed to it. `model_arguments` checks the keywords against the constructor's signature
(an unknown option, a missing one or one metalearn sets is a MetalearnError) without building anything.

Import paths: the module is imported with importlib; the current working folder is appended to sys.path first
when it is missing (the `metalearn` console script does not put it there, `python -m metalearn` does), so
`mynets.py` in the folder you run from is found; otherwise put its folder on PYTHONPATH.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Dict, Tuple, Type

from torch import nn

from ..errors import MetalearnError
from .conv4 import Conv4, ConvBlock
from .conv4_perstep import Conv4PerStep
from .mlp import MLP
from .resnet12 import DropBlock, ResNet12

MODELS = {"conv4": Conv4, "conv4_perstep": Conv4PerStep, "mlp": MLP, "resnet12": ResNet12}

STANDARD = ("in_channels", "num_classes", "image_size")
"""The arguments metalearn gives every model (from the data set); model.kwargs may not set them."""


def is_import_path(name: str) -> bool:
    """model.name names a user model (`module.path:ClassName`), not a key of MODELS."""
    return ":" in name


def resolve_model(name: str) -> Type[nn.Module]:
    """The class model.name names: MODELS[name], or the torch.nn.Module subclass at `module.path:Attr`.

    Imports the module (nothing else is run); a missing module or attribute, or an attribute that is not an
    nn.Module subclass, is a one-line MetalearnError naming the key."""
    if not is_import_path(name):
        if name not in MODELS:
            raise MetalearnError(f"model.name: unknown model {name!r}; known: {', '.join(sorted(MODELS))}, "
                                 f"or your own as module.path:ClassName")
        return MODELS[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise MetalearnError(f"model.name={name}: an import path is module.path:ClassName (e.g. mynets:MyNet)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # the console script's sys.path lacks the working folder
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own code failing: one line, not a traceback
        why = " ".join(str(e).split()) or type(e).__name__
        raise MetalearnError(f"model.name={name}: cannot import {module_name} ({why}); "
                             f"is its folder on PYTHONPATH?") from None
    obj: Any = module
    for part in attr.split("."):  # module:Class or module:Outer.Inner
        if not hasattr(obj, part):
            raise MetalearnError(f"model.name={name}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise MetalearnError(f"model.name={name}: {module_name}.{attr} is a {type(obj).__name__}, not a subclass of "
                             f"torch.nn.Module; refusing to call it")
    return obj


def _builtin_arguments(cfg: Any) -> Dict[str, Any]:
    args = {"hidden": cfg.hidden, "batchnorm": cfg.batchnorm != "none"}
    if cfg.name == "conv4_perstep":
        args["steps"] = cfg.bn_steps
    return args


_SET_BY = {"in_channels": "the data set's channels", "num_classes": "data.ways", "image_size": "data.image_size",
           "hidden": "model.hidden", "batchnorm": "model.batchnorm", "steps": "model.bn_steps"}


def model_arguments(cfg: Any, in_channels: int, num_classes: int, image_size: int) -> Tuple[Type[nn.Module], dict]:
    """(class, keyword arguments) of the model cfg (a ModelConfig) describes, checked against the constructor's
    signature: MetalearnError for an unknown or missing option or one that metalearn sets. Builds nothing."""
    cls = resolve_model(cfg.name)
    extra = dict(cfg.kwargs or {})
    given = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    if not is_import_path(cfg.name):
        given.update(_builtin_arguments(cfg))
    for key in extra:
        if cfg.name == "resnet12" and key == "hidden":
            raise MetalearnError("model.kwargs: resnet12 takes no option 'hidden' (model.hidden is not used either): "
                                 "its block widths are model.kwargs.channels, default [64, 160, 320, 640]")
        if key in given or key in STANDARD:
            raise MetalearnError(f"model.kwargs: {key} is set by metalearn (from {_SET_BY.get(key, key)}), not "
                                 f"model.kwargs")
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # no introspectable signature: pass everything, the constructor decides
        return cls, {**given, **extra}
    params = sig.parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)}
    if is_import_path(cfg.name):  # your own model: the standard arguments it takes
        given = {k: v for k, v in given.items() if var_kw or k in named}
    unknown = [k for k in extra if k not in named and not var_kw]
    if unknown:
        takes = ", ".join(n for n in params if n in named and n not in given) or "no options"
        raise MetalearnError(f"model.kwargs: {cfg.name} takes no option {', '.join(map(repr, unknown))} "
                             f"(its options: {takes})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in given
               and n not in extra and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if missing:
        raise MetalearnError(f"model.kwargs: {cfg.name}'s constructor needs {', '.join(missing)} (no default); "
                             f"give {'it' if len(missing) == 1 else 'them'} in model.kwargs")
    return cls, {**given, **extra}


def build_model(cfg: Any, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The model cfg (a ModelConfig) describes: a shipped one or your own (see the module docstring)."""
    cls, kwargs = model_arguments(cfg, in_channels, num_classes, image_size)
    return cls(**kwargs)


__all__ = ["MODELS", "Conv4", "Conv4PerStep", "ConvBlock", "DropBlock", "MLP", "ResNet12", "build_model",
           "is_import_path", "model_arguments", "resolve_model"]
