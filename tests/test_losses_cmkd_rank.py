"""What CMKD's soft rank computes on z-scored logits, by regularization strength (a property, with its proof).

torchsort's l2 soft rank (Blondel et al. 2020) at strength ``eps`` is the projection of ``theta = z / eps`` onto
the permutahedron of ``(1, ..., n)``. The affine point ``theta - mean(theta) + (n + 1) / 2`` is already inside it
(so the projection returns it) iff, for every k, the k largest centred entries of ``theta`` sum to at most
``k (n - k) / 2``. A z-scored row (mean 0, unbiased variance 1) has a top-k sum of at most
``sqrt(k (n - 1) (n - k) / n)``, so ``theta`` is inside for every k once ``eps >= 2 / sqrt(n)`` (k = 1 is the
tightest); strength 1 is such a strength from ``n >= 4`` on. So for C >= 4 and CMKD's default strength the soft
rank of z-scored logits is *exactly* affine in them, and CMKD's Spearman part
``1 - pearson(soft_rank(zs(s)), soft_rank(zs(t)))`` equals ``1 - pearson(s, t)``: a Pearson correlation of the
logits, not of their ranks. Ranks appear only at strengths below the class gaps of z-scored logits.
"""

from __future__ import annotations

import pytest
import torch
import torchsort
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.losses import build_loss
from pipeline.losses.functional import pearson, soft_rank, zscore

PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


@st.composite
def logit_rows(draw, min_c: int = 4, max_c: int = 300):
    """(B, C) float64 logits: Gaussian, or Gaussian plus one dominant class per row (a confident teacher)."""
    B, C = draw(st.integers(1, 8)), draw(st.integers(min_c, max_c))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(B, C, generator=g, dtype=torch.float64) * draw(st.floats(0.1, 50.0))
    spike = draw(st.floats(0.0, 1e4))
    x[torch.arange(B), torch.randint(0, C, (B,), generator=g)] += spike
    return x


@PROPS
@given(x=logit_rows(), factor=st.floats(1.0, 100.0))
def test_soft_rank_of_zscored_logits_is_affine_at_strengths_from_two_over_sqrt_c(x, factor):
    """Sum of squares of theta = z / eps is (C - 1) / eps^2 <= C (C - 1) / 4 iff eps >= 2 / sqrt(C): inside.
    eps = 1 is such a strength from C = 4 on (CMKD's default)."""
    z = zscore(x)  # (B, C), rows with mean 0 and unbiased std 1
    C = x.shape[1]
    strength = factor * 2.0 / C**0.5
    affine = z / strength + (C + 1) / 2  # what the projection returns when it is already inside the permutahedron
    torch.testing.assert_close(soft_rank(z, "l2", strength), affine, rtol=0, atol=1e-9)


def test_below_two_over_sqrt_c_a_confident_row_gets_ranks():
    """The bound is reached by a row with one dominant class: just below it the top class separates."""
    C = 100
    z = zscore(torch.cat([torch.tensor([[1.0]]), torch.zeros(1, C - 1)], dim=1).double())  # top z = sqrt(C - 1)
    at, below = 2.0 / C**0.5, 0.9 * 2.0 / C**0.5
    torch.testing.assert_close(soft_rank(z, "l2", at), z / at + (C + 1) / 2, rtol=0, atol=1e-9)
    assert (soft_rank(z, "l2", below) - (z / below + (C + 1) / 2)).abs().max() > 1e-3


def test_the_bound_is_tight_below_four_classes():
    """C = 3: the top z-score of (1, 0, 0) is 2/sqrt(3) > k (n - k) / 2 = 1, so the soft rank is not affine."""
    z = zscore(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert (soft_rank(z, "l2", 1.0) - (z + 2.0)).abs().max() > 0.1


def test_cmkd_spearman_part_is_pearson_of_logits_at_strength_one_and_of_ranks_at_small_strengths():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 10, generator=g, dtype=torch.float64), torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)

    def spearman_part(strength: float) -> torch.Tensor:
        loss = build_loss(
            "cmkd", use_pearson=False, entropy_weighting=False, regularization_strength=strength, ce_weight=0.0
        )
        return loss(s, t, y, epoch=1.0)["spearman"]

    pearson_of_logits = (1.0 - pearson(s, t, dim=1)).mean()
    torch.testing.assert_close(spearman_part(1.0), pearson_of_logits, rtol=0, atol=1e-9)
    # Gaps between z-scored Gaussian logits over 10 classes are ~0.3, far above 1e-6: the soft ranks are the ranks.
    hard = lambda v: v.argsort(1).argsort(1).to(v.dtype)  # noqa: E731  (B, C) ascending ranks 0..C-1
    spearman_of_ranks = (1.0 - pearson(hard(s), hard(t), dim=1)).mean()
    torch.testing.assert_close(spearman_part(1e-6), spearman_of_ranks, rtol=0, atol=1e-9)
    assert (spearman_of_ranks - pearson_of_logits).abs() > 1e-3  # the two are different quantities


def _inside_ball(theta: torch.Tensor) -> torch.Tensor:
    """(B,) whether each row's centred ``theta`` lies in the permutahedron's inscribed ball (independent form)."""
    n = theta.shape[1]
    return torch.linalg.vector_norm(theta - theta.mean(1, keepdim=True), dim=1) <= (n * (n - 1)) ** 0.5 / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("C", "strength"), [(10, 1.0), (100, 0.5), (1000, 1.0), (1000, 0.05)])
def test_closed_form_rows_and_sorted_rows_match_torchsort_values_and_gradients(dtype, C, strength):
    """A batch mixing z-scored rows (inside the ball at strengths >= 2 / sqrt(C)), raw logits and a confident row
    (outside): pipeline's soft_rank == torchsort.soft_rank in values and gradients, whichever path each row takes."""
    g = torch.Generator().manual_seed(C)
    raw = torch.randn(12, C, generator=g, dtype=torch.float64) * 3.0
    raw[0, 0] += 50.0  # confident row
    x = torch.cat([zscore(raw[:6]), raw[6:]]).to(dtype).requires_grad_(True)  # (12, C)
    inside = _inside_ball(x.detach().double() / strength)
    ours, ref = soft_rank(x, "l2", strength), torchsort.soft_rank(x, "l2", strength)
    # float32: both round theta (up to ~500 at C = 1000) to 2^-15 steps and sum in different orders.
    tol = {"atol": 1e-9, "rtol": 0} if dtype == torch.float64 else {"atol": 2e-4 * (C / 10) ** 0.5, "rtol": 0}
    torch.testing.assert_close(ours, ref, **tol)
    up = torch.randn(12, C, generator=g, dtype=torch.float64).to(dtype)
    (g_ours,) = torch.autograd.grad(ours, x, up)
    (g_ref,) = torch.autograd.grad(ref, x, up)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-9 if dtype == torch.float64 else 1e-5, rtol=0)
    if strength >= 2.0 / C**0.5:
        assert bool(inside[:6].all())  # z-scored rows take the closed form


def test_sort_path_runs_on_exactly_the_rows_outside_the_ball(monkeypatch):
    """No argsort/isotonic call when every row is inside; only the outside rows reach it otherwise."""
    from pipeline.losses import functional

    calls: list[torch.Tensor] = []
    real = functional._SoftRankL2CPU.apply

    def spy(values: torch.Tensor, strength: float) -> torch.Tensor:
        calls.append(values.detach().clone())
        return real(values, strength)

    monkeypatch.setattr(functional._SoftRankL2CPU, "apply", spy)
    g = torch.Generator().manual_seed(0)
    z = zscore(torch.randn(32, 1000, generator=g))
    soft_rank(z, "l2", 1.0)
    assert calls == []
    x = z.clone()
    x[[3, 17]] *= 100.0  # two rows far outside
    out = soft_rank(x, "l2", 1.0)
    assert len(calls) == 1 and torch.equal(calls[0], x[[3, 17]])
    torch.testing.assert_close(out[0], z[0] + 500.5, atol=1e-4, rtol=0)  # an inside row: the closed form
    torch.testing.assert_close(out, torchsort.soft_rank(x, "l2", 1.0), atol=2e-3, rtol=0)
    calls.clear()
    soft_rank(z, "l2", 0.01)  # all rows outside: one call on the whole batch
    assert len(calls) == 1 and calls[0].shape == z.shape


def test_closed_form_at_the_ball_boundary_agrees_with_the_projection():
    """A row exactly on the inscribed ball (a vertex direction scaled to radius sqrt(n (n - 1)) / 2)."""
    C = 50
    e = torch.zeros(1, C, dtype=torch.float64)
    e[0, 7] = 1.0
    d = e - e.mean()
    theta = d / torch.linalg.vector_norm(d) * (C * (C - 1)) ** 0.5 / 2  # (1, C) on the sphere
    for scale in (1.0 - 1e-12, 1.0, 1.0 + 1e-12):
        torch.testing.assert_close(
            soft_rank(theta * scale, "l2", 1.0), torchsort.soft_rank(theta * scale, "l2", 1.0), atol=1e-9, rtol=0
        )
