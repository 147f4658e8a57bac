"""Vanilla knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531)."""

from __future__ import annotations

from torch import Tensor

from .base import DistillationLoss, LossInputs, check_bool, check_number
from .functional import kl_div, zscore

__all__ = ["KDLoss"]


class KDLoss(DistillationLoss):
    """Hinton KD: ``loss = a * CE(s, y) + b * T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T))``.

    The ``T^2`` keeps the soft-target gradient magnitude independent of ``T`` (Hinton et al. 2015,
    sec. 2); the KL is summed over classes and averaged over the batch ("batchmean"), as in the
    mdistiller reference ``kd_loss``.

    ``standardize``: logit standardization (Sun et al., CVPR 2024, arXiv:2403.01427): every row of student
    and teacher logits is z-scored, ``(z - mean(z)) / (std(z) + 1e-7)`` with the unbiased std, before the
    temperature softmax (:func:`functional.zscore`, the official code's ``normalize``),
    so the student matches the teacher's logit *relations* instead of its logit range. The paper's
    CIFAR-100 settings for it are T = 2 and b = 9 (loss ``lskd``); with ``standardize`` alone the other
    parameters stay as given.

    Parts: ``ce`` = CE, ``kd`` = ``T^2 * mean_i KL_i`` (before the ``b`` weight).

    Defaults are CIFAR-100 style (mdistiller: T=4, CE 0.1, KD 0.9). ImageNet-style: T=1, a=0.5, b=0.5.

    Args:
        T: softmax temperature (> 0).
        a: weight of the cross-entropy term.
        b: weight of the distillation term.
        standardize: z-score student and teacher logits per sample before the softmax.
    """

    name = "kd"

    def __init__(self, T: float = 4.0, a: float = 0.1, b: float = 0.9, standardize: bool = False) -> None:
        super().__init__(a, ce_param="a")
        self.T = check_number("T", T, positive=True)
        self.b = check_number("b", b, nonnegative=True)
        self.standardize = check_bool("standardize", standardize)

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.standardize:
            student, teacher = zscore(student), zscore(teacher)  # (B, C) each
        kd = self.T**2 * kl_div(student, teacher, self.T).mean()  # (B,) -> scalar
        return self.b * kd, {"kd": kd}

    def hparams(self) -> dict[str, object]:
        return {"T": self.T, "a": self.ce_weight, "b": self.b, "standardize": self.standardize}
