"""CMKD's student side in one autograd node: z-score, tempered softmax, two Pearson correlations.

At CMKD's default (z-scored logits, l2 soft rank at strength >= 2 / sqrt(C)) the soft rank of a z-scored row is
exactly affine in it (``functional._soft_rank_l2_cpu``; tests/test_losses_cmkd_rank.py), so the student side of
:class:`~pipeline.losses.cmkd.CMKDLoss` is, per row of student logits ``s`` (C classes),

    z   = zs(s) = (s - mean s) / (std s + 1e-7)
    l_P = 1 - pearson(softmax(z / T), q_t)
    l_S = 1 - pearson(z / strength - mean + (C + 1) / 2, r_t) = 1 - pearson(z, r_t)

with the teacher's ``q_t`` and ``r_t`` fixed. Composed from ``zscore``, ``softmax``, ``soft_rank`` and ``pearson``,
autograd records ~40 elementwise nodes over ``(B, C)``; at C = 1000 their memory passes, not arithmetic, are most
of CMKD's cost (benchmarks/bench_losses.py). This function does the same math in ~12 passes forward and ~8
backward, with the gradient written out:

- Pearson ``r = <a_c, b_c> / (|a_c| |b_c| + eps)``: ``dr/da = b_c / D - r' a_c`` with ``D = |a_c| |b_c| + eps``
  and ``r' = <a_c, b_c> |b_c| / (|a_c| D^2)`` (both terms already centred, so centring's Jacobian drops out).
- softmax: ``du = q * (g - <g, q>)``; the tempered input: ``dz = du / T``.
- z-score ``z = c / d``, ``c = s - mean s``, ``d = sqrt(|c|^2 / (C - 1)) + eps``:
  ``dc = dz / d - c <dz, c> / (d^2 std (C - 1))``, then ``ds = dc - mean(dc)``.

Degenerate rows behave exactly as in the composed functions: numerically constant rows (``FLAT_RTOL``) get
z-score 0 / correlation 0 with zero gradient, the variance floor stops the std's gradient at a constant row.
Values and gradients equal the composition's to rounding (tests/test_losses_cmkd_fused.py, float64 gradcheck).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import _VAR_FLOOR, FLAT_RTOL, PEARSON_EPS, ZSCORE_EPS

__all__ = ["cmkd_student_parts", "rank_is_affine"]


def rank_is_affine(num_classes: int, strength: float) -> bool:
    """Whether the l2 soft rank at ``strength`` is the affine map on every z-scored row of ``num_classes``.

    A z-scored row has ``|z|^2 <= C - 1`` (unbiased std, plus eps and the floor only shrink it), inside the
    permutahedron's inscribed ball ``|theta - mean|^2 <= C (C - 1) / 4`` for ``theta = z / strength`` iff
    ``strength >= 2 / sqrt(C)``.
    """
    return strength * strength * num_classes >= 4.0


def cmkd_student_parts(
    student: Tensor, q_t: Tensor, r_t: Tensor, T: float, strength: float, pearson_part: bool, spearman_part: bool
) -> tuple[Tensor, Tensor]:
    """Per-sample ``(l_P, l_S)``, each ``(B,)``, of student logits ``(B, C)`` against the teacher's features.

    ``q_t = softmax(zs(t) / T)`` and ``r_t = soft_rank(zs(t))``, each ``(B, C)``, as
    :meth:`CMKDLoss.teacher_features` makes them. Only valid where :func:`rank_is_affine` holds. A part switched
    off is returned as zeros and costs nothing.
    """
    return _CMKDStudentParts.apply(student, q_t, r_t, float(T), float(strength), pearson_part, spearman_part)


def _pearson_stats(a_c: Tensor, b: Tensor, a_mean_sq: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pearson pieces for centred ``a_c (B, C)`` and raw ``b (B, C)``: ``(r, D, na, nb, b_c, keep)``.

    ``a_mean_sq``: the squared row mean of the raw ``a``, the same for every row here (softmax rows: 1 / C;
    ranks: (C + 1) / 2), so ``|a|^2 = |a_c|^2 + C mean^2`` without a pass.
    ``keep (B,)`` is False on the rows :func:`functional.pearson` calls numerically constant (value 0, no gradient).
    """
    n = a_c.shape[1]
    b_mean = b.mean(1, keepdim=True)  # (B, 1)
    b_c = b - b_mean  # (B, C)
    na_sq = (a_c * a_c).sum(1)  # (B,)
    nb_sq = (b_c * b_c).sum(1)  # (B,)
    na, nb = na_sq.sqrt(), nb_sq.sqrt()  # (B,)
    D = na * nb + PEARSON_EPS  # (B,)
    r = (a_c * b_c).sum(1) / D  # (B,)
    # functional.pearson: flat if |a_c| <= FLAT_RTOL |a| (same for b); |a|^2 = |a_c|^2 + C mean(a)^2.
    a_norm = (na_sq + n * a_mean_sq).sqrt()
    b_norm = (nb_sq + n * b_mean.squeeze(1).square()).sqrt()
    keep = (na > FLAT_RTOL * a_norm) & (nb > FLAT_RTOL * b_norm)  # (B,)
    return r * keep, D, na, nb, b_c, keep


def _pearson_grad(g_r: Tensor, a_c: Tensor, b_c: Tensor, r: Tensor, D: Tensor, na: Tensor, nb: Tensor) -> Tensor:
    """``g_r (B,) * d pearson / d a`` ``(B, C)``: ``b_c / D - (<a_c, b_c> |b_c| / (|a_c| D^2)) a_c``."""
    # r here is <a_c, b_c> / D, already zero on dropped rows (where g_r is zero too); |a_c| = 0 only on those.
    coef_a = (r * nb / (torch.where(na > 0, na, 1.0) * D)).unsqueeze(1)  # (B, 1)
    return g_r.unsqueeze(1) * (b_c / D.unsqueeze(1) - coef_a * a_c)


class _CMKDStudentParts(torch.autograd.Function):
    """See the module docstring; forward ``(B, C) -> (B,), (B,)``, backward written out."""

    @staticmethod
    def forward(ctx, student, q_t, r_t, T, strength, pearson_part, spearman_part):  # type: ignore[override]
        n = student.shape[1]
        # z-score (functional.zscore): (B, C)
        s_mean = student.mean(1, keepdim=True)  # (B, 1)
        c = student - s_mean  # (B, C)
        var = (c * c).sum(1, keepdim=True) / max(n - 1, 1)  # (B, 1)
        std = var.clamp_min(_VAR_FLOOR).sqrt()  # (B, 1)
        d = std + ZSCORE_EPS  # (B, 1)
        rms = (var * (max(n - 1, 1) / n) + s_mean.square()).sqrt()  # (B, 1) |s| / sqrt(C), identity, no pass
        live = std > FLAT_RTOL * rms  # (B, 1) False: numerically constant row -> z = 0, zero gradient
        z = c * (live / d)  # (B, C)
        l_p = l_s = student.new_zeros(student.shape[0])  # (B,) a part switched off
        saved: list[Tensor] = [c, d, std, var, live]
        if pearson_part:
            q = (z / T).softmax(dim=1)  # (B, C)
            q_c = q - 1.0 / n  # rows of q sum to 1: mean exactly 1/C up to rounding
            r, D, na, nb, b_c, keep = _pearson_stats(q_c, q_t, 1.0 / n**2)
            l_p = 1.0 - r
            saved += [q, q_c, b_c, r, D, na, nb, keep]
        if spearman_part:
            # soft rank = z / strength - mean + (C + 1) / 2 (affine); Pearson ignores the shift, so a_c is the centred
            # z / strength and only the flat test sees the shift (|rank|^2 = |a_c|^2 + C ((C + 1) / 2)^2).
            a_c = (z - z.mean(1, keepdim=True)) / strength  # (B, C)
            r2, D2, na2, nb2, b2_c, keep2 = _pearson_stats(a_c, r_t, ((n + 1) / 2) ** 2)
            l_s = 1.0 - r2
            saved += [a_c, b2_c, r2, D2, na2, nb2, keep2]
        ctx.save_for_backward(*saved)
        ctx.T, ctx.strength, ctx.parts, ctx.n = T, strength, (pearson_part, spearman_part), n
        return l_p, l_s

    @staticmethod
    def backward(ctx, g_lp, g_ls):  # type: ignore[override]
        c, d, std, var, live, *rest = ctx.saved_tensors
        pearson_part, spearman_part = ctx.parts
        n = ctx.n
        g_z = torch.zeros_like(c)  # (B, C)
        if pearson_part:
            q, q_c, b_c, r, D, na, nb, keep, *rest = rest
            g_q = _pearson_grad(-g_lp * keep, q_c, b_c, r, D, na, nb)  # (B, C), l_P = 1 - r
            g_u = q * (g_q - (g_q * q).sum(1, keepdim=True))  # softmax backward
            g_z = g_z + g_u / ctx.T
        if spearman_part:
            a_c, b2_c, r2, D2, na2, nb2, keep2 = rest
            g_a = _pearson_grad(-g_ls * keep2, a_c, b2_c, r2, D2, na2, nb2)  # (B, C), l_S = 1 - r
            g_z = g_z + g_a / ctx.strength  # centring's Jacobian is dropped here: the final centring covers it
        # z = c / d on live rows; d = sqrt(max(var, floor)) + eps, var = |c|^2 / (C - 1).
        std_live = (var >= _VAR_FLOOR).to(c.dtype)  # (B, 1) the clamp passes no gradient below the floor
        coef = (g_z * c).sum(1, keepdim=True) * std_live / (d * d * std * max(n - 1, 1))  # (B, 1)
        g_c = (g_z / d - coef * c) * live  # (B, C)
        g_s = g_c - g_c.mean(1, keepdim=True)  # through c = s - mean s
        return g_s, None, None, None, None, None, None
