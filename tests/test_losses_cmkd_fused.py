"""CMKD's fused student side (pipeline/losses/cmkd_fused.py) against the composed functions it replaces.

The reference is the composition ``zscore -> softmax -> pearson`` and ``zscore -> soft_rank -> pearson`` with
autograd (``CMKDLoss`` with its fused path switched off), itself tested against a pure-Python CMKD in
tests/test_losses.py; float64 gradcheck checks the hand-written backward on its own.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.losses import build_loss
from pipeline.losses.cmkd import CMKDLoss
from pipeline.losses.cmkd_fused import cmkd_student_parts, rank_is_affine

PROPS = settings(max_examples=40, deadline=None, derandomize=True, database=None)
ABLATIONS = [
    {},
    {"entropy_weighting": False},
    {"use_pearson": False, "entropy_weighting": False},
    {"use_spearman": False, "entropy_weighting": False},
    {"regularization_strength": 3.0, "T": 1.0},
    {"spearman_heavy_when": "low_entropy", "scale": 2.0},
]


def logits(B: int, C: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student ``(B, C)`` with a constant row and a confident row, teacher ``(B, C)`` with a constant row, target."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g, dtype=torch.float64) * 3.0
    s[0] = 1.5  # numerically constant: z-score 0, no gradient
    s[1, 0] += 40.0
    t = torch.randn(B, C, generator=g, dtype=torch.float64) * 5.0
    t[2] = -2.0
    return s.to(dtype), t.to(dtype), torch.randint(0, C, (B,), generator=g)


def loss_and_grad(loss: CMKDLoss, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, fused: bool):
    """(output dict, d loss / d student) with the fused path on or off."""
    loss.fused = (lambda n: CMKDLoss.fused(loss, n)) if fused else (lambda n: False)
    s = s.detach().requires_grad_(True)
    out = loss(s, t, y, epoch=1.0)
    (grad,) = torch.autograd.grad(out["loss"], s)
    return {k: v.detach() for k, v in out.items()}, grad


@pytest.mark.parametrize("params", ABLATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [4, 10, 1000])
def test_fused_equals_composed_values_and_gradients(params, dtype, C):
    s, t, y = logits(32, C, dtype, seed=C)
    loss = build_loss("cmkd", **params)
    assert loss.fused(C)
    fused, g_fused = loss_and_grad(loss, s, t, y, fused=True)
    ref, g_ref = loss_and_grad(loss, s, t, y, fused=False)
    assert fused.keys() == ref.keys()
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 5e-6, "rtol": 1e-5}
    for k in ref:
        torch.testing.assert_close(fused[k], ref[k], **tol)
    torch.testing.assert_close(g_fused, g_ref, atol=1e-15 if dtype == torch.float64 else 1e-8, rtol=1e-5)
    _, g_distill = loss_and_grad(build_loss("cmkd", **params, ce_weight=0.0), s, t, y, fused=True)
    assert g_distill[0].abs().max() == 0 and g_distill[1:].abs().max() > 0  # the constant student row: none


@PROPS
@given(
    B=st.integers(1, 6),
    C=st.integers(4, 60),
    scale=st.floats(1e-3, 1e3),
    T=st.floats(0.5, 8.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_equals_composed_on_random_logits(B, C, scale, T, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    t = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (B,), generator=g)
    loss = build_loss("cmkd", T=T)
    fused, g_fused = loss_and_grad(loss, s, t, y, fused=True)
    ref, g_ref = loss_and_grad(loss, s, t, y, fused=False)
    for k in ref:
        torch.testing.assert_close(fused[k], ref[k], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g_fused, g_ref, atol=1e-14, rtol=1e-8)


@pytest.mark.parametrize(("pearson_part", "spearman_part"), [(True, True), (True, False), (False, True)])
def test_hand_written_backward_passes_gradcheck(pearson_part, spearman_part):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    feats = build_loss("cmkd").teacher_features(torch.randn(5, 7, generator=g, dtype=torch.float64))
    weights = torch.rand(2, 5, generator=g, dtype=torch.float64)  # distinct upstream gradients per part and row

    def f(x: torch.Tensor) -> torch.Tensor:
        l_p, l_s = cmkd_student_parts(x, feats["q"], feats["rank"], 2.0, 1.5, pearson_part, spearman_part)
        return (weights[0] * l_p + weights[1] * l_s).sum()

    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize(
    ("params", "C", "fused"),
    [
        ({}, 4, True),  # 2 / sqrt(4) = 1: the default strength is exactly at the bound
        ({}, 3, False),  # below 4 classes the soft rank of z-scores is not affine (test_losses_cmkd_rank.py)
        ({"regularization_strength": 0.1}, 10, False),
        ({"regularization_strength": 0.1}, 400, True),
        ({"use_zscore": False}, 100, False),
        ({"regularization": "kl"}, 100, False),
    ],
)
def test_fused_path_only_where_the_soft_rank_is_affine(params, C, fused):
    loss = build_loss("cmkd", **params)
    assert loss.fused(C) is fused
    other_reason = not loss.use_zscore or loss.regularization != "l2"
    assert rank_is_affine(C, loss.regularization_strength) is (fused or other_reason)
