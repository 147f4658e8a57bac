"""Multi-teacher KD from an ensemble's member logits: the average of per-teacher KD terms, or CA-MKD's
confidence-aware per-sample teacher weights (Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge
Distillation", ICASSP 2022, arXiv:2201.00007)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import DistillationLoss, LossInputs, check_bool, check_choice, check_number
from .functional import kl_div, zscore

__all__ = ["MTKDLoss"]

_WEIGHTINGS = ("mean", "confidence")


class MTKDLoss(DistillationLoss):
    """KD against each member teacher separately instead of against their combined logits.

    With member logits ``z_m`` (``m = 1..M``, the ``members`` input of an ensemble store) and
    ``KL_{i,m} = KL(softmax(z_{m,i}/T) || softmax(s_i/T))``:

    ``loss = a * CE + b * T^2 * mean_i sum_m w_{i,m} KL_{i,m}``, with ``sum_m w_{i,m} = 1``:

    - ``weighting: mean``: ``w = 1/M``, the average of the per-teacher KD terms (the "AVERAGE_LOSS"
      baseline of the CA-MKD code, github.com/Rorozhl/CA-MKD ``helper/loops.py``). Unlike KD on the
      mean of the logits or probabilities, the student is pulled toward every teacher's distribution.
    - ``weighting: confidence``: CA-MKD's sample-wise teacher reliability from the ground truth: with
      ``L_{i,m} = CE(z_{m,i}, y_i)``, ``w_{i,m} = (1 - softmax_m(L_{i,m})) / (M - 1)``, i.e. the member whose
      prediction is closer to the one-hot label (lower CE) gets the larger weight, per sample (the
      reference's ``attention``). The reference code
      then also divides the weighted sum by ``M``; here the weights sum to 1 so both weightings share one
      scale (that constant factor belongs in ``b``). With one member the weight is 1.

    ``standardize``: logit standardization (Sun et al., CVPR 2024) of the student and of every member
    before the tempered softmaxes (see ``kd``).

    Without ``members`` (a single teacher's store) the teacher is the only member, ``M = 1``: the loss is
    exactly ``kd`` with the same ``T``, ``a``, ``b``, ``standardize``, so a distill matrix that crosses
    single teachers and ensembles with ``mtkd`` stays well defined.

    Parts: ``kd`` (``T^2 * mean_i sum_m w KL``, before ``b``), ``teachers`` (M, as a float).

    Args:
        T: softmax temperature (> 0).
        a: weight of the cross-entropy term.
        b: weight of the distillation term.
        weighting: ``mean`` | ``confidence``.
        standardize: z-score student and member logits per sample before the softmax.
    """

    name = "mtkd"
    mixes = False  # reads the hard target (see DistillationLoss.mixes)
    reads = frozenset({"members"})

    def __init__(
        self, T: float = 4.0, a: float = 0.1, b: float = 0.9, weighting: str = "mean", standardize: bool = False
    ) -> None:
        super().__init__(a, ce_param="a")
        self.T = check_number("T", T, positive=True)
        self.b = check_number("b", b, nonnegative=True)
        self.weighting = check_choice("weighting", weighting, _WEIGHTINGS)
        self.standardize = check_bool("standardize", standardize)

    def member_weights(self, members: Tensor, target: Tensor) -> Tensor:
        """Per-sample teacher weights ``(B, M)`` summing to 1 over the members, from ``members (B, M, C)``."""
        B, M, _ = members.shape
        if self.weighting == "mean" or M == 1:
            return members.new_full((B, M), 1.0 / M)
        # (B, M): each member's cross-entropy against the label; raw logits (standardization is for matching)
        ce = -F.log_softmax(members, dim=2).gather(2, target[:, None, None].expand(B, M, 1)).squeeze(2)
        return (1.0 - ce.softmax(dim=1)) / (M - 1)

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        members = inputs.members if inputs.members is not None else teacher[:, None, :]  # (B, M, C)
        w = self.member_weights(members, target)  # (B, M)
        if self.standardize:
            student, members = zscore(student), zscore(members)  # (B, C), (B, M, C)
        kl = kl_div(student[:, None, :].expand_as(members), members, self.T)  # (B, M)
        kd = self.T**2 * (w * kl).sum(dim=1).mean()  # scalar
        return self.b * kd, {"kd": kd, "teachers": student.new_tensor(float(members.shape[1]))}

    def hparams(self) -> dict[str, object]:
        return {
            "T": self.T,
            "a": self.ce_weight,
            "b": self.b,
            "weighting": self.weighting,
            "standardize": self.standardize,
        }
