"""Uncertainty for the report: confidence intervals over seeds and paired tests over test images.

Plain numpy and `math` (no scipy), each piece checked against published table values or a naive
implementation in `tests/test_stats.py`:

- `mean_ci`: mean, sample std and the two-sided t-interval `mean ± t_{1-α/2, n-1} · s / √n` over seeds
  (`t_quantile`: Student's t quantile through the regularized incomplete beta function,
  Press et al., *Numerical Recipes* §6.4).
- `mcnemar_midp`: McNemar's test for two classifiers scored on the same images, exact conditional on the
  discordant pairs (b = A right & B wrong, c = A wrong & B right; b ~ Binomial(b + c, 1/2) under H0), with
  the mid-p correction (Fagerland, Lydersen & Laake 2013: the mid-p keeps the exact test's validity without
  its conservatism). Used for one seed.
- `paired_bootstrap`: with several seeds the (seed, image) outcomes are not independent (every seed scores
  the same images), so instead of pooling discordant pairs the test resamples *images* (each with all its
  seeds, for both methods), and the statistic is the seed-mean accuracy difference. Seeds are held fixed:
  seed-to-seed variation is what `mean_ci` shows.
- `paired_comparison`: the one the report calls: the difference in points, its 95% bootstrap interval and
  the p-value of the test that fits the number of seeds (named in the result).

A verdict about *methods* needs more than one training run of each (`Paired.significant`, `MIN_SEEDS`): with one
seed, McNemar's test asks whether these two trained networks differ on these test images, which they nearly always
do; another seed, or the same seed on a CPU with other kernels, trains other networks and can flip the sign (issue
32: cmkd - kd on one seed read -0.32 points, p 0.139, on one machine and -0.77, p < 0.001, on another). So with one
seed the difference, interval and p are still reported, as a description of that run, but never called
significant; stars, bold and "significantly below CE" come only from the test over several seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: resamples of the paired bootstrap: p-values resolve to ~1e-4, interval ends to ~0.1 of their standard error
BOOTSTRAP_RESAMPLES = 10_000


# ---------------------------------------------------------------------------------------------
# Student's t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes `betacf`)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side; use symmetry otherwise
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom: 1 - I_{df/(df+t²)}(df/2, 1/2) / 2 for t >= 0."""
    if df <= 0:
        raise ValueError(f"t distribution needs df > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (`df` degrees of freedom), by bisection on `t_cdf` to 1e-12."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean over n values, their sample std (ddof 1) and the t confidence interval (None for n = 1)."""

    mean: float
    std: float | None
    lo: float | None
    hi: float | None
    n: int


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """`mean ± t_{(1+level)/2, n-1} · s/√n` over independent runs (seeds); one value has no std or interval."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_ci of no values")
    m = float(a.mean())
    if a.size == 1:
        return Interval(m, None, None, None, 1)
    s = float(a.std(ddof=1))
    half = t_quantile((1.0 + level) / 2.0, a.size - 1) * s / math.sqrt(a.size)
    return Interval(m, s, m - half, m + half, int(a.size))


# ---------------------------------------------------------------------------------------------
# paired tests on per-image correctness


def _binom_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic, one rounding at the end)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact conditional McNemar p-value: min(1, 2 P(X <= min(b, c))), X ~ Bin(b + c, 1/2)."""
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2.0 * _binom_half_cdf(min(b, c), n))


def mcnemar_midp(b: int, c: int) -> float:
    """Two-sided mid-p McNemar: 2 P(X <= k) - P(X = k), k = min(b, c), X ~ Bin(b + c, 1/2) (1.0 when b = c)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    return min(1.0, 2.0 * _binom_half_cdf(k, n) - math.comb(n, k) / 2**n)


def _as_runs(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=bool)
    return x[None, :] if x.ndim == 1 else x


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float, float]:
    """Paired bootstrap over test images of the seed-mean accuracy difference A - B.

    a, b: (S, N) per-image correctness, row s = seed s of each method, column i = test image i (or (N,)).
    Each resample draws N images with replacement, keeping each image's S seeds of both methods together.
    The statistic only depends on how often each value of d_i = mean_s (a_si - b_si) is drawn, so it is
    sampled exactly as multinomial counts over the (at most 2S + 1) distinct values of d: no (B, N) matrix.
    Returns (observed difference, interval low, interval high, two-sided p) with the percentile interval
    at `level` and p = min(1, 2 min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1)).
    """
    a, b = _as_runs(a), _as_runs(b)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: shapes differ {a.shape} vs {b.shape}")
    n = a.shape[1]
    d = a.mean(0) - b.mean(0)  # (N,): per-image seed-mean difference
    values, counts = np.unique(d, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)  # (B, K)
    stats = draws @ values / n  # (B,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    below, above = int((stats <= 0).sum()), int((stats >= 0).sum())
    p = min(1.0, 2.0 * (min(below, above) + 1) / (resamples + 1))
    return float(d.mean()), float(lo), float(hi), p


@dataclass(frozen=True)
class Paired:
    """Method A against method B on the same test images: difference in accuracy (fraction), interval, p."""

    diff: float
    lo: float
    hi: float
    p: float
    test: str  # "McNemar mid-p" (one seed) or "paired bootstrap" (several seeds pooled)
    seeds: int
    images: int
    a_only: int  # images A gets right and B wrong (summed over seeds)
    b_only: int  # images B gets right and A wrong

    @property
    def one_run(self) -> bool:
        """One training run per method: the test describes those two networks, not the two methods."""
        return self.seeds < MIN_SEEDS

    def significant(self, alpha: float = 0.05) -> bool:
        """A verdict about the methods: p < alpha in the test over `MIN_SEEDS` or more seeds; never from one run
        per method, however small its p (see the module docstring)."""
        return not self.one_run and self.p < alpha


MCNEMAR, BOOTSTRAP = "McNemar mid-p", "paired bootstrap"
#: training runs (seeds) per method below which no comparison is called significant
MIN_SEEDS = 2


def paired_comparison(a: np.ndarray, b: np.ndarray, seed: int = 0) -> Paired:
    """A vs B on per-image correctness (S, N) (same teacher, budget and seeds, rows in the same seed order).

    The interval is always the paired bootstrap's (95%); the p-value is McNemar's mid-p for one seed (exact,
    the standard test for two classifiers on one test set) and the paired bootstrap's for several seeds.
    """
    a, b = _as_runs(a), _as_runs(b)
    diff, lo, hi, p_boot = paired_bootstrap(a, b, seed=seed)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    if a.shape[0] == 1:
        return Paired(diff, lo, hi, mcnemar_midp(a_only, b_only), MCNEMAR, 1, a.shape[1], a_only, b_only)
    return Paired(diff, lo, hi, p_boot, BOOTSTRAP, a.shape[0], a.shape[1], a_only, b_only)
