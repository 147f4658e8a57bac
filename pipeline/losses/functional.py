"""Pure tensor math shared by the distillation losses.

Every helper is stateless, works on any floating dtype it is given (the loss modules promote to at
least float32 before calling them), and is written so that its gradient stays finite on the
degenerate inputs a training run meets: constant rows (all-equal logits), one-hot-like softmaxes
from huge logits, and two classes.
"""

from __future__ import annotations

import numpy
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FLAT_RTOL",
    "PEARSON_EPS",
    "ZSCORE_EPS",
    "compute_dtype",
    "entropy",
    "kl_div",
    "kl_div_log",
    "pearson",
    "soft_rank",
    "zscore",
]

#: Added to the product of norms in :func:`pearson`, as in the DIST reference code
#: (``cosine_similarity(a, b, eps=1e-8)`` in hunto/DIST_KD); keeps constant vectors at correlation 0.
PEARSON_EPS = 1e-8
#: Added to the standard deviation in :func:`zscore`, as in logit standardization (Sun et al. 2024)
#: and the CMKD spec (eps 1e-7).
ZSCORE_EPS = 1e-7
# Variance floor inside zscore's sqrt: only there so d sqrt(v)/dv stays finite at v = 0 (a constant row);
# far below any real variance, so values are unchanged.
_VAR_FLOOR = 1e-30
#: A vector whose centred spread is at most this fraction of its magnitude is *numerically constant*:
#: what centring leaves is rounding noise (float32 sums over C classes err by ~1e-7 relative). Pearson
#: and z-score are scale-invariant, so their gradient grows like 1/spread; on such vectors the
#: references' eps (1e-8, 1e-7) would turn rounding noise into ~1e7 gradients (~1e15 when CMKD chains
#: z-score and Pearson), e.g. for a zero-initialised student head. We instead apply the value the
#: formula has on an exactly constant vector (correlation 0, z-score 0) with zero gradient. Vectors with
#: real spread are untouched, so all values match the published formulas.
FLAT_RTOL = 1e-5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses compute in: at least float32 (float16/bfloat16 are promoted, float64 kept)."""
    return torch.promote_types(dtype, torch.float32)


def kl_div_log(log_p_teacher: Tensor, log_q_student: Tensor, dim: int = -1) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` along ``dim`` from log-probabilities.

    Working from log-probabilities (never ``log(softmax)``) keeps the value finite when a probability
    underflows: ``p_c = 0`` contributes exactly 0 (PyTorch's ``kl_div(log_target=True)`` evaluates
    ``exp(log p) * (log p - log q)``), and ``log q_c`` stays finite where ``q_c`` would round to 0.
    """
    # (..., C) -> (...)
    return F.kl_div(log_q_student, log_p_teacher, reduction="none", log_target=True).sum(dim)


def kl_div(student_logits: Tensor, teacher_logits: Tensor, T: float, dim: int = -1) -> Tensor:
    """Per-row ``KL(softmax(t/T) || softmax(s/T))`` (Hinton et al. 2015), NOT multiplied by ``T^2``.

    Shapes: ``(..., C)`` -> ``(...)``. Invariant to adding a constant to a row of either input.
    """
    return kl_div_log(
        F.log_softmax(teacher_logits / T, dim=dim),
        F.log_softmax(student_logits / T, dim=dim),
        dim=dim,
    )


def entropy(logits: Tensor, T: float = 1.0, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits/T)`` along ``dim``: ``-sum_c p_c log p_c``.

    Shapes: ``(..., C)`` -> ``(...)``. Uses ``xlogy``-style evaluation through log_softmax so a
    probability that underflows to 0 contributes 0, not NaN.
    """
    log_p = F.log_softmax(logits / T, dim=dim)
    return -(log_p.exp() * log_p).sum(dim)


def pearson(a: Tensor, b: Tensor, dim: int = -1, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``.

    ``r = <a - mean(a), b - mean(b)> / (||a - mean(a)|| * ||b - mean(b)|| + eps)``, the form of the
    DIST reference implementation (Huang et al. 2022). The ``eps`` makes a constant vector
    correlate 0 with anything instead of 0/0; for vectors with non-negligible spread it is
    invisible. Invariant to positive affine maps of either argument, sign-flipped by negative ones.
    Numerically constant vectors (spread <= ``FLAT_RTOL`` * magnitude) give exactly 0, zero gradient.

    Shapes: ``a, b (..., n, ...)`` -> the shape with ``dim`` removed.
    """
    a_c = a - a.mean(dim, keepdim=True)
    b_c = b - b.mean(dim, keepdim=True)
    norm_a = torch.linalg.vector_norm(a_c, dim=dim)  # gradient 0 (not NaN) at the zero vector
    norm_b = torch.linalg.vector_norm(b_c, dim=dim)
    r = (a_c * b_c).sum(dim) / (norm_a * norm_b + eps)
    # Numerically constant vectors correlate 0, with zero gradient (see FLAT_RTOL).
    flat = (norm_a <= FLAT_RTOL * torch.linalg.vector_norm(a, dim=dim)) | (
        norm_b <= FLAT_RTOL * torch.linalg.vector_norm(b, dim=dim)
    )
    return r.masked_fill(flat, 0.0)


def zscore(z: Tensor, dim: int = -1, eps: float = ZSCORE_EPS) -> Tensor:
    """Standardize along ``dim``: ``(z - mean) / (std + eps)`` with the unbiased std (``torch.std``).

    This is logit standardization (Sun et al., CVPR 2024) as used by CMKD (Niu et al. 2024): it
    removes each sample's logit scale before a temperature softmax or a soft ranking. A
    (numerically) constant row maps to all zeros, with zero gradient. Shapes preserved.
    """
    n = z.shape[dim]
    z_c = z - z.mean(dim, keepdim=True)
    # Unbiased variance written out (not torch.std) so the sqrt can be floored: torch.std's
    # backward is NaN at zero spread, and ties (all-equal logits) are a case we must survive.
    var = (z_c * z_c).sum(dim, keepdim=True) / max(n - 1, 1)
    std = var.clamp_min(_VAR_FLOOR).sqrt()
    # Numerically constant rows map to 0 with zero gradient (see FLAT_RTOL) instead of amplifying
    # rounding noise by 1/eps.
    rms = z.detach().square().mean(dim, keepdim=True).sqrt()
    return (z_c / (std + eps)).masked_fill(std.detach() <= FLAT_RTOL * rms, 0.0)


def soft_rank(values: Tensor, regularization: str = "l2", regularization_strength: float = 1.0) -> Tensor:
    """Differentiable ranks along the last dim (Blondel et al., ICML 2020, via ``torchsort``).

    ``soft_rank(theta)`` is the projection of ``theta / strength`` onto the permutahedron of
    ``(1, ..., n)`` (``l2``) or its KL analogue (``kl``); as ``strength -> 0`` it tends to the hard
    ascending ranks 1..n (largest value -> n). Shapes: ``(B, n)`` -> ``(B, n)``.

    CPU tensors with ``l2`` take :func:`_soft_rank_l2_cpu`: rows already inside the permutahedron get
    the projection's closed form (no sort), the others :class:`_SoftRankL2CPU`, the same computation as
    ``torchsort.soft_rank`` with numpy's argsort in place of ``torch.sort``; other cases call torchsort
    directly. torchsort's kernels handle float32/float64 only, so lower precisions are promoted.
    """
    if values.dim() != 2:
        raise ValueError(f"soft_rank expects a (B, n) tensor, got shape {tuple(values.shape)}")
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    if regularization == "l2" and values.device.type == "cpu":
        return _soft_rank_l2_cpu(values, float(regularization_strength))
    import torchsort  # local import: only CMKD needs the compiled extension

    return torchsort.soft_rank(values, regularization=regularization, regularization_strength=regularization_strength)


def _soft_rank_l2_cpu(values: Tensor, strength: float) -> Tensor:
    """l2 soft rank on CPU, ``(B, n) -> (B, n)``: closed form for rows inside the permutahedron, sort otherwise.

    The projection of ``theta = values / strength`` onto the permutahedron P of ``(1, ..., n)`` is
    ``theta - mean(theta) + (n + 1) / 2`` (the point moved into P's hyperplane) whenever that point is already
    in P. P contains the ball around its centre of radius ``sqrt(n (n - 1)) / 2`` (distance to its nearest
    facets, ``x_i <= n``: ``k (n - k) / 2`` over ``sqrt(k (n - k) / n)`` at k = 1), so a row whose centred
    ``theta`` has a sum of squares ``<= n (n - 1) / 4`` needs no sort and no isotonic regression. This covers
    every z-scored row at strength ``>= 2 / sqrt(n)``, CMKD's default (tests/test_losses_cmkd_rank.py); the
    gradient of the closed form is the projection's Jacobian there, ``(I - 11^T / n) / strength``. The
    closed form and torchsort's PAV kernel agree up to rounding (tested); rows outside the ball take the sort.
    On CPU the branch costs no device sync, which is why the closed form is taken here only.
    """
    theta = values / strength if strength != 1.0 else values  # (B, n)
    n = theta.shape[1]
    centred = theta - theta.mean(dim=1, keepdim=True)  # (B, n) in P's hyperplane up to the shift below
    inside = centred.detach().square().sum(dim=1) <= n * (n - 1) / 4  # (B,) inside P's inscribed ball
    if bool(inside.all()):
        return centred + (n + 1) / 2
    outside = (~inside).nonzero().squeeze(1)  # (k,) rows that need the projection
    if outside.numel() == theta.shape[0]:
        return _SoftRankL2CPU.apply(values, strength)
    # (B, n): out-of-place index_put keeps autograd through both the closed-form and the projected rows.
    return (centred + (n + 1) / 2).index_put((outside,), _SoftRankL2CPU.apply(values[outside], strength))


class _SoftRankL2CPU(torch.autograd.Function):
    """torchsort's ``SoftRank`` (l2) with the descending sort done by numpy.

    ``torch.sort`` on CPU dominates ``torchsort.soft_rank`` (~0.8 ms of ~1.1 ms for a (256, 100)
    float32 batch with one thread, ~6x slower than ``numpy.argsort``). Everything else is torchsort's:
    sort ``s = theta / strength`` descending, dual = isotonic regression (PAV, torchsort's C++ kernel)
    of ``s - (n, ..., 1)``, ranks = ``s - dual`` put back in input order; backward through the same
    kernel. Tied values are pooled by the isotonic step, so the order numpy gives ties is irrelevant.
    """

    @staticmethod
    def forward(ctx, values: Tensor, strength: float) -> Tensor:  # type: ignore[override]
        from torchsort.isotonic_cpu import isotonic_l2

        theta = values / strength if strength != 1.0 else values  # (B, n)
        n = theta.shape[1]
        perm = torch.from_numpy(numpy.argsort(-theta.detach().numpy(), axis=1))  # (B, n) descending order
        s = theta.gather(1, perm)  # (B, n) sorted descending
        w = torch.arange(n, 0, -1, dtype=theta.dtype).expand_as(s)  # (n, ..., 1)
        dual = isotonic_l2(s - w)  # (B, n)
        ctx.save_for_backward(s, dual, perm)
        ctx.strength = strength
        # Back to input order: scattering by perm is gathering by the inverse permutation, without building it.
        return torch.empty_like(s).scatter_(1, perm, s - dual)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        from torchsort.isotonic_cpu import isotonic_l2_backward

        s, dual, perm = ctx.saved_tensors
        g_sorted = isotonic_l2_backward(s, dual, grad_output.gather(1, perm))  # (B, n) in sorted order
        grad = grad_output - torch.empty_like(g_sorted).scatter_(1, perm, g_sorted)
        return (grad / ctx.strength if ctx.strength != 1.0 else grad), None
