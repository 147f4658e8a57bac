"""Property tests (hypothesis) for pipeline.losses: invariances, minima and numerical robustness.

Invariance properties run on float64 inputs (the losses keep float64, promoting only lower
precisions), so they can be checked tightly; robustness properties use float16/bfloat16/float32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.losses import LOSSES, build_loss
from pipeline.losses.functional import pearson

PROPS = settings(max_examples=40, deadline=None, derandomize=True, database=None)
ALL = sorted(LOSSES)
COMBOS = ["dkd+cmkd", "kd+ckd"]


@st.composite
def batches(draw, min_b: int = 2, max_b: int = 12, min_c: int = 2, max_c: int = 24, dtype=torch.float64):
    """(student (B, C), teacher (B, C), target (B,), seed) with logits ~ N(0, scale^2)."""
    B = draw(st.integers(min_b, max_b))
    C = draw(st.integers(min_c, max_c))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.5, 10.0))
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y, seed


def run(name: str, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, groups: torch.Tensor | None = None):
    """A fresh module per call, so CKD's seeded sampler draws the same groups every time."""
    loss = build_loss(name)
    kwargs = {"groups": groups} if groups is not None else {}
    return loss(s, t, y, epoch=7.0, **kwargs)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=rtol, atol=atol), f"{key}: {float(a[key])} vs {float(b[key])}"


# --- Pearson ---------------------------------------------------------------------------------------


@PROPS
@given(batches(min_c=3), st.floats(0.05, 100.0), st.floats(-100.0, 100.0), st.booleans())
def test_pearson_affine_invariance_and_sign_flip(batch, alpha, beta, negate):
    """Exact with eps=0 (the mathematical definition); the default eps only shrinks |r| slightly."""
    s, t, _, _ = batch
    a = -alpha if negate else alpha
    for dim in (1, 0):  # per sample over classes, and per class over the batch (DIST's intra-class use)
        r = pearson(s, t, dim=dim, eps=0.0)
        expected = -r if negate else r
        assert torch.allclose(pearson(a * s + beta, t, dim=dim, eps=0.0), expected, rtol=1e-9, atol=1e-9)
        assert torch.allclose(pearson(s, a * t + beta, dim=dim, eps=0.0), expected, rtol=1e-9, atol=1e-9)
        assert (r.abs() <= 1 + 1e-12).all()
        r_eps = pearson(s, t, dim=dim)
        assert (r_eps.abs() <= r.abs() + 1e-12).all() and torch.allclose(r_eps, r, atol=1e-6)


# --- invariances -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL + COMBOS)
@PROPS
@given(batch=batches(), shift_scale=st.floats(0.0, 100.0))
def test_row_constant_shift_invariance(name, batch, shift_scale):
    """softmax, z-scores, ranks and group differences ignore a per-row constant; so must every loss."""
    s, t, y, seed = batch
    g = torch.Generator().manual_seed(seed + 1)
    cs = (torch.rand(s.shape[0], 1, generator=g, dtype=torch.float64) * 2 - 1) * shift_scale
    ct = (torch.rand(s.shape[0], 1, generator=g, dtype=torch.float64) * 2 - 1) * shift_scale
    close(run(name, s, t, y), run(name, s + cs, t + ct, y), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ALL + COMBOS)
@PROPS
@given(batch=batches())
def test_joint_class_permutation_invariance(name, batch):
    """Relabelling classes consistently (logits and targets) changes nothing; CKD with the same groups."""
    s, t, y, seed = batch
    C = s.shape[1]
    perm = torch.randperm(C, generator=torch.Generator().manual_seed(seed))
    inv = perm.argsort()
    groups = None
    if "ckd" in name:
        groups = torch.stack(
            [torch.randperm(s.shape[0], generator=torch.Generator().manual_seed(seed + i))[:2] for i in range(8)]
        )
    close(run(name, s, t, y, groups), run(name, s[:, perm], t[:, perm], inv[y], groups), rtol=1e-7, atol=1e-9)


# --- minimum at student == teacher -----------------------------------------------------------------

DISTILL_PARTS = {
    "kd": ["kd"],
    "dkd": ["tckd", "nckd"],
    "dist": ["inter", "intra"],
    "cmkd": ["pearson", "spearman"],
    "ckd": ["ckd"],
}


def _eps_gap(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``1 - mean pearson(v, v)`` for the reference's additive eps: ``mean eps / (|v_c|^2 + eps)``."""
    n2 = ((v - v.mean(dim, keepdim=True)) ** 2).sum(dim)
    return (1e-8 / (n2 + 1e-8)).mean()


def _expected_correlation_parts(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Correlation parts at student == teacher: 0 up to the reference eps, predicted independently."""
    if name == "dist":
        p = (t / 4).softmax(1)
        return {"inter": _eps_gap(p, 1), "intra": _eps_gap(p, 0)}
    import torchsort

    z = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-7)
    return {"pearson": _eps_gap((z / 4).softmax(1), 1), "spearman": _eps_gap(torchsort.soft_rank(z), 1)}


@pytest.mark.parametrize("name", sorted(DISTILL_PARTS))
@PROPS
@given(batch=batches(), noise=st.floats(0.1, 3.0))
def test_distillation_parts_vanish_when_student_equals_teacher(name, batch, noise):
    _, t, y, seed = batch
    same = run(name, t.clone(), t, y)
    if name in ("kd", "dkd", "ckd"):
        # KL-based parts: exactly 0, and KL >= 0 makes it the minimum.
        g = torch.Generator().manual_seed(seed + 2)
        other = run(name, t + noise * torch.randn(t.shape, generator=g, dtype=t.dtype), t, y)
        for part in DISTILL_PARTS[name]:
            assert abs(float(same[part])) <= 1e-12
            assert float(same[part]) <= float(other[part]) + 1e-12
    else:
        # Correlation parts: 1 - |a|^2 / (|a|^2 + 1e-8) per vector (the reference's eps), i.e. 0 unless a
        # vector is nearly constant (e.g. a class whose probability barely varies across a tiny batch).
        expected = _expected_correlation_parts(name, t)
        for part in DISTILL_PARTS[name]:
            assert torch.allclose(same[part], expected[part], rtol=1e-6, atol=1e-12), part


# --- numerical robustness --------------------------------------------------------------------------


def _edge_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    B, C = 6, 10
    y = torch.randint(0, C, (B,), generator=g)
    huge_s = torch.where(torch.rand(B, C, generator=g) > 0.5, 1e4, -1e4)
    huge_t = torch.where(torch.rand(B, C, generator=g) > 0.5, 1e4, -1e4)
    ties_row = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 0.0, 1.0, 2.0]).expand(B, C).clone()
    return {
        "two_classes": (torch.randn(B, 2, generator=g), torch.randn(B, 2, generator=g), y % 2),
        "all_equal": (torch.zeros(B, C), torch.zeros(B, C), y),
        "all_equal_student": (torch.full((B, C), 3.0), torch.randn(B, C, generator=g), y),
        "ties_within_rows": (ties_row, ties_row.flip(1).clone(), y),
        "huge": (huge_s, huge_t, y),
        "huge_vs_normal": (huge_s, torch.randn(B, C, generator=g), y),
        "batch_of_one": (torch.randn(1, C, generator=g), torch.randn(1, C, generator=g), y[:1]),
    }


EDGE = _edge_cases()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(EDGE))
@pytest.mark.parametrize("name", ALL + COMBOS)
def test_finite_loss_and_gradients_on_edge_cases(name, case, dtype):
    s, t, y = EDGE[case]
    s = s.detach().to(dtype).clone().requires_grad_(True)  # a fresh leaf: EDGE is shared across tests
    out = run(name, s, t.to(dtype), y)
    assert all(torch.isfinite(v) for v in out.values()), {k: float(v) for k, v in out.items()}
    out["loss"].backward()
    assert s.grad is not None and s.grad.dtype == dtype
    assert torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("name", ALL)
@PROPS
@given(
    batch=batches(min_b=1, dtype=torch.float32),
    log_scale=st.floats(-2.0, 4.0),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_finite_gradients_across_scales_and_dtypes(name, batch, log_scale, dtype):
    s, t, y, _ = batch
    factor = 10.0**log_scale  # logits up to ~1e4-1e5 in magnitude (clamped to the float16 range)
    s = (s * factor).clamp(-6e4, 6e4).to(dtype).requires_grad_(True)
    t = (t * factor).clamp(-6e4, 6e4).to(dtype)
    out = run(name, s, t, y)
    assert out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(s.grad.float()).all()
