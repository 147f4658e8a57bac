"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, arXiv:2203.08679)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DistillationLoss, LossInputs, check_bool, check_number
from .functional import kl_div_log, zscore

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
    a probability underflows) and NCKD masks the target with -1e30 (an exact zero after exp: the
    paper's definition over the non-target classes). The two agree to float32 precision whenever the
    target's tempered logit exceeds the others by less than ~900 (beyond that the reference's
    ``exp(-1000 + gap)`` no longer underflows and its mask leaks), i.e. at any sane logit scale.

    ``standardize``: logit standardization (Sun et al., CVPR 2024, arXiv:2403.01427): z-score every row of
    student and teacher logits (``functional.zscore``) before the tempered softmaxes, as the official code
    does for DKD. Its CIFAR-100 recipe for "DKD + Ours" (``tools/train.py --logit-stand --base-temp 2
    --kd-weight 9``) multiplies alpha and beta by 9 and sets T = 2: alpha = 9, beta = 72, T = 2.

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
        standardize: z-score student and teacher logits per sample before the softmax.
    """

    name = "dkd"
    mixes = False  # reads the hard target (see DistillationLoss.mixes)

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        T: float = 4.0,
        warmup: float = 20.0,
        ce_weight: float = 1.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(ce_weight)
        self.alpha = check_number("alpha", alpha, nonnegative=True)
        self.beta = check_number("beta", beta, nonnegative=True)
        self.T = check_number("T", T, positive=True)
        self.warmup = check_number("warmup", warmup, nonnegative=True)
        self.standardize = check_bool("standardize", standardize)

    def warmup_factor(self, epoch: float) -> float:
        """``min(epoch / warmup, 1)``; 1 when ``warmup == 0``."""
        if self.warmup == 0:
            return 1.0
        return min(max(float(epoch), 0.0) / self.warmup, 1.0)

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        epoch = inputs.epoch
        if epoch is None:
            raise ValueError(
                "dkd needs the epoch for its warm-up: call loss(student, teacher, target, epoch=...) "
                f"(warmup={self.warmup} epochs; use warmup=0 to disable the ramp)"
            )
        if self.standardize:
            student, teacher = zscore(student), zscore(teacher)  # (B, C) each
        is_target = F.one_hot(target, student.shape[1]).bool()  # (B, C)
        tckd_s, nckd_s = _decoupled_log_probs(student / self.T, target, is_target)  # (B, 2), (B, C)
        tckd_t, nckd_t = _decoupled_log_probs(teacher / self.T, target, is_target)
        tckd = self.T**2 * kl_div_log(tckd_t, tckd_s, dim=1).mean()
        # The target column holds ~-1e30 on both sides: exp() is exactly 0 there, so it adds exactly 0.
        nckd = self.T**2 * kl_div_log(nckd_t, nckd_s, dim=1).mean()

        factor = self.warmup_factor(epoch)
        total = factor * (self.alpha * tckd + self.beta * nckd)
        return total, {"tckd": tckd, "nckd": nckd, "warmup": student.new_tensor(factor)}

    def hparams(self) -> dict[str, object]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "T": self.T,
            "warmup": self.warmup,
            "ce_weight": self.ce_weight,
            "standardize": self.standardize,
        }


# Stands in for log(0) on the masked target column: exp() underflows to exactly 0 like -inf would, but
# (-1e30 - a) - (-1e30 - b) evaluates to 0 instead of NaN inside the KL.
_MASKED = -1e30


def _decoupled_log_probs(z: Tensor, target: Tensor, is_target: Tensor) -> tuple[Tensor, Tensor]:
    """From tempered logits ``z (B, C)``: binary ``(log p_y, log(1 - p_y))`` ``(B, 2)`` and the
    non-target log-distribution ``log p_hat`` ``(B, C)`` (target column ~ -1e30, i.e. probability 0).

    All from two log-sum-exps: ``log p_y = z_y - LSE(z)``, ``log(1 - p_y) = LSE_{c != y}(z) - LSE(z)``
    (accurate when ``p_y`` rounds to 1), ``log p_hat_c = z_c - LSE_{c != y}(z)``.
    """
    lse_all = z.logsumexp(dim=1, keepdim=True)  # (B, 1)
    z_rest = z.masked_fill(is_target, _MASKED)  # (B, C)
    lse_rest = z_rest.logsumexp(dim=1, keepdim=True)  # (B, 1)
    log_binary = torch.cat([z.gather(1, target[:, None]) - lse_all, lse_rest - lse_all], dim=1)  # (B, 2)
    return log_binary, z_rest - lse_rest
