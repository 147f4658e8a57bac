"""What CMKD's soft rank computes on z-scored logits, by regularization strength (a property, with its proof).

torchsort's l2 soft rank (Blondel et al. 2020) of ``theta`` at strength ``eps`` is the projection of
``theta / eps`` onto the permutahedron of ``(1, ..., n)``. The affine point ``theta / eps - mean + (n + 1) / 2``
is already inside it iff, for every k, the sum of the k largest centred entries of ``theta / eps`` is at most
``k (n - k) / 2``. A z-scored row (mean 0, unbiased variance 1) has a top-k sum of at most
``sqrt(k (n - 1) (n - k) / n)``, which is ``<= k (n - k) / 2`` for every k once ``n >= 4``. So for C >= 4 and
strength >= 1 the soft rank of z-scored logits is *exactly* affine in them, and CMKD's Spearman part
``1 - pearson(soft_rank(zs(s)), soft_rank(zs(t)))`` equals ``1 - pearson(s, t)``: a Pearson correlation of the
logits, not of their ranks. Ranks appear only at strengths below the class gaps of z-scored logits.
"""

from __future__ import annotations

import torch
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
@given(x=logit_rows(), strength=st.floats(1.0, 100.0))
def test_soft_rank_of_zscored_logits_is_affine_from_four_classes_at_strength_one(x, strength):
    z = zscore(x)  # (B, C), rows with mean 0 and unbiased std 1
    C = x.shape[1]
    affine = z / strength + (C + 1) / 2  # what the projection returns when it is already inside the permutahedron
    torch.testing.assert_close(soft_rank(z, "l2", strength), affine, rtol=0, atol=1e-9)


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
