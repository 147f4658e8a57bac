"""Plain cross-entropy: the no-teacher baseline."""

from __future__ import annotations

from torch import Tensor

from .base import DistillationLoss, LossInputs

__all__ = ["CELoss"]


class CELoss(DistillationLoss):
    """Cross-entropy only: ``loss = weight * CE(s, y)``; the teacher logits are accepted and ignored.

    ``CE = -mean_i log softmax(s_i)[y_i]``. It takes the same ``forward`` arguments as every
    distillation loss so the training loop never special-cases the baseline.

    Args:
        weight: multiplier of the CE term (default 1.0).
    """

    name = "ce"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight, ce_param="weight")

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # No distillation term: a zero that still lives on the right device/dtype.
        return student.new_zeros(()), {}

    def hparams(self) -> dict[str, object]:
        return {"weight": self.ce_weight}
