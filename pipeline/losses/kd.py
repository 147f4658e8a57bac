"""Vanilla knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531)."""

from __future__ import annotations

from torch import Tensor

from .base import DistillationLoss, check_number
from .functional import kl_div

__all__ = ["KDLoss"]


class KDLoss(DistillationLoss):
    """Hinton KD: ``loss = a * CE(s, y) + b * T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T))``.

    The ``T^2`` keeps the soft-target gradient magnitude independent of ``T`` (Hinton et al. 2015,
    sec. 2); the KL is summed over classes and averaged over the batch ("batchmean"), as in the
    mdistiller reference ``kd_loss``.

    Parts: ``ce`` = CE, ``kd`` = ``T^2 * mean_i KL_i`` (before the ``b`` weight).

    Defaults are CIFAR-100 style (mdistiller: T=4, CE 0.1, KD 0.9). ImageNet-style: T=1, a=0.5, b=0.5.

    Args:
        T: softmax temperature (> 0).
        a: weight of the cross-entropy term.
        b: weight of the distillation term.
    """

    name = "kd"

    def __init__(self, T: float = 4.0, a: float = 0.1, b: float = 0.9) -> None:
        super().__init__(a, ce_param="a")
        self.T = check_number("T", T, positive=True)
        self.b = check_number("b", b, nonnegative=True)

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, epoch: float | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        kd = self.T**2 * kl_div(student, teacher, self.T).mean()  # (B,) -> scalar
        return self.b * kd, {"kd": kd}

    def hparams(self) -> dict[str, object]:
        return {"T": self.T, "a": self.ce_weight, "b": self.b}
