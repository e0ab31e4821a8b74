"""The inner loop and the masks that say which parameters it adapts."""
from .loop import forward, inner_loop
from .masks import select

__all__ = ["forward", "inner_loop", "select"]
