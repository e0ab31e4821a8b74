"""Meta-learning algorithms. Each returns metric dicts and never imports tracking."""
from .maml import MAML

ALGORITHMS = {"maml": MAML, "fomaml": MAML}

__all__ = ["ALGORITHMS", "MAML"]
