"""Confidence intervals, said for what they are.

Two kinds of 95% interval appear in results:

- **over episodes** (`evaluation.mean_ci95`): one model scored on n = 600 fixed episodes; with n
  that large the normal interval mean ± 1.96·s/√n is accurate. It measures how well the episodes pin
  down *this model's* accuracy, not how much training with another seed would move it.
- **over seeds** (`t_interval`): one value per training seed, n = 2..5 typically. With so few values
  the normal quantile 1.96 is far too small: the interval uses Student's t with n − 1 degrees of
  freedom, mean ± t_{0.975, n−1}·s/√n (t = 12.71 at n = 2, 4.30 at n = 3, 2.78 at n = 5).

With one seed there is no spread over seeds to measure; tables then show the run's episode interval
and say so.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

# t_{0.975, df} for df = 1..30 (two-sided 95%), to 3 decimals (standard tables).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1): the table above up to
    30, then the Cornish-Fisher expansion around the normal quantile (error < 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def t_interval(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval of the mean); half-width nan for one value
    (no spread can be measured from one seed)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, float("nan")
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n)


__all__ = ["t_interval", "t_quantile_975"]
