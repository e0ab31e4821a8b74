"""metalearn: few-shot meta-learning in PyTorch.

Public surface: configs, data, models, the inner loop, algorithms and evaluation.

Importing the package imports metalearn.validation, which registers the checks that need the data set,
model and algorithm registries with `config.validate` (config.py itself imports none of them).
"""
from .algorithms import MAML
from .config import Config, load_config
from .errors import MetalearnError
from .evaluation import EvalResult, evaluate, mean_ci95
from .inner import inner_loop, select
from .types import Examples, Params, Task, TaskBatch
from . import validation  # noqa: E402,F401  registers the registries' checks with config.validate (see config.py)

__version__ = "0.1.0"

__all__ = ["MAML", "Config", "EvalResult", "Examples", "MetalearnError", "Params", "Task", "TaskBatch", "evaluate",
           "inner_loop", "load_config", "mean_ci95", "select"]
