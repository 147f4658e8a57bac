"""Intervals and paired tests: golden values from published tables, exact small cases, a naive bootstrap."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.evaluation.stats import (
    BOOTSTRAP,
    MCNEMAR,
    betainc,
    mcnemar_exact,
    mcnemar_midp,
    mean_ci,
    paired_bootstrap,
    paired_comparison,
    t_cdf,
    t_quantile,
)

# Student's t, two-sided 95% (q = 0.975), from the standard table (e.g. NIST/SEMATECH e-Handbook, Table 1.4.2)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045, 100: 1.984}


@pytest.mark.parametrize("df,t", sorted(T_975.items()))
def test_t_quantile_matches_the_table(df, t):
    assert t_quantile(0.975, df) == pytest.approx(t, abs=6e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-10)
    assert t_quantile(0.025, df) == pytest.approx(-t, abs=6e-4)


def test_t_closed_forms_and_betainc():
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1.0, 1.0, x) == pytest.approx(x)
        assert betainc(3.0, 1.0, x) == pytest.approx(x**3)  # I_x(a, 1) = x^a
    assert betainc(4.5, 4.5, 0.5) == pytest.approx(0.5)  # symmetry
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_mean_ci():
    iv = mean_ci([1.0, 2.0, 3.0])
    assert (iv.mean, iv.std, iv.n) == (2.0, 1.0, 3)
    half = 4.302653 / math.sqrt(3)
    assert iv.lo == pytest.approx(2 - half, abs=1e-5) and iv.hi == pytest.approx(2 + half, abs=1e-5)
    one = mean_ci([0.87])
    assert one.std is None and one.lo is None and one.hi is None
    with pytest.raises(ValueError):
        mean_ci([])


def _exact_p(b: int, c: int) -> tuple[Fraction, Fraction]:
    """Exact and mid-p two-sided McNemar in rational arithmetic (an independent formulation: both tails summed)."""
    n = b + c
    pmf = [Fraction(math.comb(n, i), 2**n) for i in range(n + 1)]
    obs = pmf[b]
    exact = sum(p for p in pmf if p <= obs)  # tail probabilities as or more extreme (symmetric binomial)
    mid = exact - obs if b != c else Fraction(1)
    return min(exact, Fraction(1)), mid


def test_mcnemar_golden_and_exact():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, example with b = 1, c = 7:
    # exact conditional p = 0.070, mid-p = 0.039 (18/256 and 10/256)
    assert mcnemar_exact(1, 7) == pytest.approx(18 / 256) and mcnemar_midp(1, 7) == pytest.approx(10 / 256)
    assert mcnemar_midp(7, 1) == mcnemar_midp(1, 7)  # two-sided
    assert mcnemar_midp(5, 5) == 1.0 and mcnemar_midp(0, 0) == 1.0 and mcnemar_exact(0, 0) == 1.0
    for b, c in [(0, 3), (2, 9), (10, 25), (40, 41), (120, 90)]:
        exact, mid = _exact_p(b, c)
        assert mcnemar_exact(b, c) == pytest.approx(float(exact), rel=1e-12)
        if b != c:
            assert mcnemar_midp(b, c) == pytest.approx(float(mid), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300))
def test_mcnemar_properties(b, c):
    p, m = mcnemar_exact(b, c), mcnemar_midp(b, c)
    assert 0.0 <= m <= p <= 1.0  # mid-p is never more conservative than the exact test


def test_paired_bootstrap_matches_naive_image_resampling():
    rng = np.random.default_rng(3)
    n, s = 800, 3
    a = rng.random((s, n)) < 0.80
    b = rng.random((s, n)) < 0.76
    diff, lo, hi, p = paired_bootstrap(a, b, resamples=4000, seed=1)
    assert diff == pytest.approx(a.mean() - b.mean())
    # naive: resample image indices, recompute the seed-mean difference
    idx = rng.integers(0, n, size=(4000, n))
    d = a.mean(0) - b.mean(0)
    naive = d[idx].mean(1)
    assert lo == pytest.approx(np.quantile(naive, 0.025), abs=0.004)
    assert hi == pytest.approx(np.quantile(naive, 0.975), abs=0.004)
    assert lo < diff < hi and p < 0.05
    # identical methods: no difference, p = 1
    assert paired_bootstrap(a, a, resamples=500) == (0.0, 0.0, 0.0, 1.0)


def test_paired_comparison_names_its_test():
    rng = np.random.default_rng(0)
    a = rng.random((1, 500)) < 0.8
    b = a.copy()
    b[0, :30] = ~b[0, :30]  # 30 discordant images
    one = paired_comparison(a, b)
    assert one.test == MCNEMAR and one.seeds == 1 and one.images == 500
    assert one.a_only + one.b_only == 30 and one.p == mcnemar_midp(one.a_only, one.b_only)
    three = paired_comparison(np.repeat(a, 3, 0), np.repeat(b, 3, 0))
    assert three.test == BOOTSTRAP and three.seeds == 3
    assert three.diff == pytest.approx(one.diff)
