"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, arXiv:2203.08679)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DistillationLoss, check_number
from .functional import kl_div, kl_div_log

__all__ = ["DKDLoss"]


class DKDLoss(DistillationLoss):
    """DKD: ``loss = ce_weight * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)``.

    With ``p = softmax(z / T)`` and target class ``y``:

    - TCKD (target-class KD) is the binary KL between ``b = (p_y, 1 - p_y)`` of teacher and student,
      times ``T^2``: ``T^2 * KL(b_t || b_s)``, batch mean.
    - NCKD (non-target-class KD) is the KL between the distributions *among the non-target classes*,
      ``p_hat_c = softmax(z / T)_c`` over ``c != y`` (renormalised), times ``T^2``, batch mean.

    Warm-up: the distillation term ramps linearly from 0 over the first ``warmup`` epochs (epoch may
    be fractional, e.g. ``epoch + step / steps_per_epoch``); ``warmup = 0`` disables the ramp.

    Numerics, versus the reference code (megvii-research/mdistiller ``dkd_loss``): the reference
    takes ``log`` of the summed binary probabilities and masks the target for NCKD by subtracting
    ``1000 * one_hot`` from ``z / T``. Here ``log b`` comes from log-sum-exp (same value, finite when
    a probability underflows) and NCKD drops the target column outright, which is the paper's
    definition; the two agree to float32 precision whenever the target's tempered logit exceeds the
    others by less than ~900 (exp(-1000 + 900) already underflows), i.e. everywhere except at absurd
    logit scales where the reference's mask would leak.

    Parts: ``tckd`` and ``nckd`` (each including ``T^2``, before alpha/beta), ``warmup`` (the ramp
    factor in [0, 1]).

    Defaults are the paper's CIFAR-100 ones (alpha=1, beta=8, T=4, warmup=20; beta is tuned per
    teacher/student pair in the paper, 8 for most). ImageNet: alpha=0.5, beta=0.5, T=1, warmup=1.

    Args:
        alpha: weight of TCKD.
        beta: weight of NCKD.
        T: softmax temperature (> 0).
        warmup: epochs of linear warm-up of the distillation term (>= 0).
        ce_weight: weight of the cross-entropy term.
    """

    name = "dkd"
    needs_epoch = True

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: float = 20.0, ce_weight: float = 1.0
    ) -> None:
        super().__init__(ce_weight)
        self.alpha = check_number("alpha", alpha, nonnegative=True)
        self.beta = check_number("beta", beta, nonnegative=True)
        self.T = check_number("T", T, positive=True)
        self.warmup = check_number("warmup", warmup, nonnegative=True)

    def warmup_factor(self, epoch: float) -> float:
        """``min(epoch / warmup, 1)``; 1 when ``warmup == 0``."""
        if self.warmup == 0:
            return 1.0
        return min(max(float(epoch), 0.0) / self.warmup, 1.0)

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, epoch: float | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if epoch is None:
            raise ValueError(
                "dkd needs the epoch for its warm-up: call loss(student, teacher, target, epoch=...) "
                f"(warmup={self.warmup} epochs; use warmup=0 to disable the ramp)"
            )
        B, C = student.shape
        is_target = F.one_hot(target, C).bool()  # (B, C)

        # TCKD: binary distributions (p_y, 1 - p_y) in log space.
        log_bin_s = _log_binary(F.log_softmax(student / self.T, dim=1), is_target)  # (B, 2)
        log_bin_t = _log_binary(F.log_softmax(teacher / self.T, dim=1), is_target)  # (B, 2)
        tckd = self.T**2 * kl_div_log(log_bin_t, log_bin_s, dim=1).mean()

        # NCKD: drop the target column -> (B, C-1), then an ordinary tempered KL (softmax renormalises).
        keep = ~is_target
        nckd = self.T**2 * kl_div(student[keep].view(B, C - 1), teacher[keep].view(B, C - 1), self.T, dim=1).mean()

        factor = self.warmup_factor(epoch)
        total = factor * (self.alpha * tckd + self.beta * nckd)
        return total, {"tckd": tckd, "nckd": nckd, "warmup": student.new_tensor(factor)}

    def hparams(self) -> dict[str, object]:
        return {"alpha": self.alpha, "beta": self.beta, "T": self.T, "warmup": self.warmup, "ce_weight": self.ce_weight}


def _log_binary(log_p: Tensor, is_target: Tensor) -> Tensor:
    """``(log p_y, log(1 - p_y))`` per row from log-probabilities ``(B, C)`` -> ``(B, 2)``.

    ``log(1 - p_y)`` is the log-sum-exp of the non-target log-probabilities, which stays accurate
    (and finite) when ``p_y`` rounds to 1 in floating point.
    """
    log_p_target = log_p.masked_select(is_target)  # (B,) = log p_y, one True per row
    log_p_rest = log_p.masked_fill(is_target, float("-inf")).logsumexp(dim=1)  # (B,) = log(1 - p_y)
    return torch.stack([log_p_target, log_p_rest], dim=1)
