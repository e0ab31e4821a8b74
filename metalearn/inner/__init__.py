"""The inner loop, its update rules and learning-rate specs, and the masks that say which parameters it adapts."""
from .loop import InnerResult, adapt, forward, inner_loop, run_inner_loop
from .masks import select
from .rules import Adam, AdamState, LRSpec, PerElementLR, PerStepLR, SGD, lr_of

__all__ = ["Adam", "AdamState", "InnerResult", "LRSpec", "PerElementLR", "PerStepLR", "SGD", "adapt", "forward",
           "inner_loop", "lr_of", "run_inner_loop", "select"]
