"""Which parameters adapt (inner loop) or train (outer loop) is data: name patterns, not branches.

    select(names, ["*"])            -> every parameter (MAML)
    select(names, ["head.*"])       -> only the head (ANIL-style)
    select(names, ["features.*"])   -> only the body (BOIL-style)
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, List, Sequence

from ..errors import MetalearnError


def select(names: Iterable[str], patterns: Sequence[str], what: str = "mask") -> List[str]:
    """Names matching any pattern, in the given order. A pattern matching nothing is an error."""
    names = list(names)
    for p in patterns:
        if not any(fnmatchcase(n, p) for n in names):
            raise MetalearnError(f"{what}: pattern {p!r} matches no parameter; parameters are {', '.join(names)}")
    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]
