"""DIST: knowledge distillation from a stronger teacher (Huang, You, Wang, Qian & Xu, NeurIPS 2022,
arXiv:2205.10536)."""

from __future__ import annotations

from torch import Tensor

from .base import DistillationLoss, LossInputs, check_number
from .functional import pearson

__all__ = ["DISTLoss"]


class DISTLoss(DistillationLoss):
    """DIST: relation matching by Pearson correlation instead of KL.

    With ``p = softmax(z / T)`` of shape ``(B, C)``:

    - inter-class relation: ``inter = 1 - mean_i pearson(p_s[i, :], p_t[i, :])`` (per sample, over classes)
    - intra-class relation: ``intra = 1 - mean_c pearson(p_s[:, c], p_t[:, c])`` (per class, over the batch)
    - ``loss = ce_weight * CE + w * T^2 * (beta * inter + gamma * intra)``

    ``pearson`` is the reference's ``cov / (||a_c|| * ||b_c|| + 1e-8)`` (hunto/DIST_KD ``dist_kd.py``).
    Defaults (CIFAR-100): beta = gamma = 1, T = 4, w = 2, i.e. the same loss as beta = gamma = 2 with
    w = 1; keeping ``w`` separate makes the relative weight and the overall scale independent knobs.
    ImageNet-scale: beta = gamma = 1, T = 1, w = 1.

    Batch size 1: the intra-class term is undefined (a correlation over one sample). The reference
    code silently returns ``pearson = 0`` there, i.e. a constant ``intra = 1`` with zero gradient;
    this loss instead *drops the term* (``intra`` part reported as 0, not added). The gradient is
    therefore exactly the reference's, without a meaningless constant in the loss value, and a
    ragged last batch of one sample never crashes a run.

    Parts: ``inter``, ``intra`` (the raw ``1 - mean pearson`` values, before ``w * T^2 * beta/gamma``).

    Args:
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        T: softmax temperature (> 0).
        w: overall weight of the distillation term.
        ce_weight: weight of the cross-entropy term.
    """

    name = "dist"

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, T: float = 4.0, w: float = 2.0, ce_weight: float = 1.0
    ) -> None:
        super().__init__(ce_weight)
        self.beta = check_number("beta", beta, nonnegative=True)
        self.gamma = check_number("gamma", gamma, nonnegative=True)
        self.T = check_number("T", T, positive=True)
        self.w = check_number("w", w, nonnegative=True)

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        p_s = (student / self.T).softmax(dim=1)  # (B, C)
        p_t = (teacher / self.T).softmax(dim=1)  # (B, C)
        inter = 1.0 - pearson(p_s, p_t, dim=1).mean()  # (B,) -> scalar
        if student.shape[0] > 1:
            intra = 1.0 - pearson(p_s, p_t, dim=0).mean()  # (C,) -> scalar
            relation = self.beta * inter + self.gamma * intra
        else:
            intra = student.new_zeros(())  # undefined for one sample: dropped (see class docstring)
            relation = self.beta * inter
        return self.w * self.T**2 * relation, {"inter": inter, "intra": intra}

    def hparams(self) -> dict[str, object]:
        return {"beta": self.beta, "gamma": self.gamma, "T": self.T, "w": self.w, "ce_weight": self.ce_weight}
