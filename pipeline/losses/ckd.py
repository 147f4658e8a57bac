"""CKD: comparative knowledge distillation (Wilf, Xu, Liang, Obolenskiy, Fried & Morency 2023,
arXiv:2311.02253)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import DistillationLoss, LossConfigError, LossInputs, check_bool, check_int, check_number
from .functional import kl_div, zscore

__all__ = ["CKDLoss"]


class CKDLoss(DistillationLoss):
    """CKD: distil the teacher's view of the *difference* between groups of samples.

    A comparison is a group of ``k`` distinct batch rows split evenly into ``A`` (first ``k/2``) and
    ``B`` (last ``k/2``). With ``d(z) = mean_{a in A} z_a - mean_{b in B} z_b`` (a ``C``-vector):

    ``ckd = T^2 * mean_g KL(softmax(d_g(z_t) / T) || softmax(d_g(z_s) / T))``

    ``loss = ce_weight * CE + weight * ckd``.

    Because the comparisons are built from rows whose teacher logits are already cached, a batch of
    ``B`` rows yields up to ``B (B - 1)`` ordered pairs from ``B`` teacher calls: many learning signals
    per call, the point of CKD under a teacher-query budget.

    Sampling: each step draws ``groups_per_step`` groups, each ``k`` distinct rows chosen uniformly
    without replacement (groups are independent of each other, so a pair may repeat), from the
    module's own ``torch.Generator`` seeded with ``seed``; its state is part of ``state_dict()`` so a
    resumed run continues the same stream. Later code may pass explicit ``groups`` (a ``(G, k)``
    LongTensor of row indices, ``k`` even) to ``forward`` instead, e.g. pairs reused from a pool.
    A batch with fewer than ``k`` rows has no comparison: the term is 0.

    Adding a per-row constant to the logits shifts ``d_g`` by a per-group constant, which the
    softmax ignores, so CKD shares KD's shift invariance.

    ``standardize``: logit standardization (Sun et al., CVPR 2024, arXiv:2403.01427) applied to what CKD's
    temperature softmax sees, the difference vectors: ``d_g`` of student and teacher are z-scored
    (``functional.zscore``) before ``/ T``. (Z-scoring each sample's logits before taking differences would
    leave the differences' scale to the student, the magnitude match standardization removes.)

    Parts: ``ckd`` (with ``T^2``, before ``weight``) and ``groups`` (number of distinct comparisons
    used, as a float; a group is identified by its unordered A set and unordered B set).

    Args:
        T: softmax temperature (> 0).
        group_size: rows per comparison ``k`` (even, >= 2; 2 = plain pairs).
        groups_per_step: comparisons drawn per forward call (>= 1).
        seed: seed of the group sampler.
        weight: weight of the comparative term.
        ce_weight: weight of the cross-entropy term.
        standardize: z-score the group differences of student and teacher before the softmax.
    """

    name = "ckd"
    reads = frozenset({"groups"})

    def __init__(
        self,
        T: float = 4.0,
        group_size: int = 2,
        groups_per_step: int = 128,
        seed: int = 0,
        weight: float = 1.0,
        ce_weight: float = 1.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(ce_weight)
        self.T = check_number("T", T, positive=True)
        self.group_size = check_int("group_size", group_size, minimum=2)
        if self.group_size % 2:
            raise LossConfigError(f"group_size must be even (split into equal halves A and B), got {group_size}")
        self.groups_per_step = check_int("groups_per_step", groups_per_step, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.weight = check_number("weight", weight, nonnegative=True)
        self.standardize = check_bool("standardize", standardize)
        self.generator = torch.Generator().manual_seed(self.seed)  # CPU: indices are tiny

    # -- sampler state travels with the module so resumed runs draw the same groups -------------
    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def sample_groups(self, batch_size: int) -> Tensor:
        """Draw ``(groups_per_step, group_size)`` row indices (CPU int64); ``(0, k)`` if ``batch_size < k``."""
        k = self.group_size
        if batch_size < k:
            return torch.empty(0, k, dtype=torch.long)
        # k distinct rows per group: the first k of a uniformly random permutation of the batch
        # (the k smallest of B iid uniform keys, in key order: a uniform random ordered k-subset; topk is
        # O(B) per group where a full argsort is O(B log B)).
        keys = torch.rand(self.groups_per_step, batch_size, generator=self.generator)  # (G, B)
        return keys.topk(k, dim=1, largest=False).indices  # (G, k)

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        B = student.shape[0]
        groups = inputs.groups
        if groups is None:
            groups = self.sample_groups(B)
        groups = _check_groups(groups, B).to(student.device)  # (G, k)
        G, k = groups.shape
        if G == 0:
            zero = student.new_zeros(())
            return zero, {"ckd": zero, "groups": zero}
        half = k // 2
        # (G, C): group-mean logit difference A - B, same groups for student and teacher
        d_s = student[groups[:, :half]].mean(dim=1) - student[groups[:, half:]].mean(dim=1)
        d_t = teacher[groups[:, :half]].mean(dim=1) - teacher[groups[:, half:]].mean(dim=1)
        if self.standardize:
            d_s, d_t = zscore(d_s), zscore(d_t)  # (G, C) each
        ckd = self.T**2 * kl_div(d_s, d_t, self.T).mean()  # (G,) -> scalar
        return self.weight * ckd, {"ckd": ckd, "groups": student.new_tensor(float(_count_distinct(groups)))}

    def hparams(self) -> dict[str, object]:
        return {
            "T": self.T,
            "group_size": self.group_size,
            "groups_per_step": self.groups_per_step,
            "seed": self.seed,
            "weight": self.weight,
            "ce_weight": self.ce_weight,
            "standardize": self.standardize,
        }


def _check_groups(groups: Tensor, batch_size: int) -> Tensor:
    """Validate explicit comparison groups: ``(G, k)`` integer indices in ``[0, batch_size)``, ``k`` even."""
    if groups.dim() != 2 or groups.shape[1] < 2 or groups.shape[1] % 2:
        raise ValueError(f"groups must be a (G, k) tensor with k even and >= 2, got shape {tuple(groups.shape)}")
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"groups must hold integer row indices, got dtype {groups.dtype}")
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= batch_size):
        raise ValueError(f"groups index rows outside the batch of {batch_size}")
    return groups.long()


def _count_distinct(groups: Tensor) -> int:
    """Number of distinct comparisons: order inside A and inside B does not matter, A vs B does."""
    half = groups.shape[1] // 2
    canonical = torch.cat([groups[:, :half].sort(dim=1).values, groups[:, half:].sort(dim=1).values], dim=1)
    return int(torch.unique(canonical, dim=0).shape[0])
