"""Uncertainty of results over seeds: mean, sample standard deviation and a 95% Student-t interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

# 0.975 quantiles of Student's t for 1..30 degrees of freedom (tables; no scipy dependency)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (normal 1.96 beyond 30)."""
    if df < 1:
        raise ValueError("a t interval needs at least two values")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_std_ci(values: Sequence[float]) -> tuple[float, float, float | None]:
    """(mean, sample std (ddof 1; 0 for one value), half-width of the 95% t-interval of the mean or None)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t975(n - 1) * std / math.sqrt(n)


def format_mean(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """`mean ± std [lo, hi]` (scaled, e.g. to %), or just the value for a single seed."""
    mean, std, half = mean_std_ci(values)
    if half is None:
        return f"{mean * scale:.{digits}f}"
    m, s, h = mean * scale, std * scale, half * scale
    return f"{m:.{digits}f} ± {s:.{digits}f} [{m - h:.{digits}f}, {m + h:.{digits}f}]"
