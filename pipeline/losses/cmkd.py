"""CMKD: correlation matching knowledge distillation (Niu, Wang, Cai & Hou 2024, "Efficient and Robust
Knowledge Distillation from A Stronger Teacher Based on Correlation Matching", arXiv:2410.06561)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import DistillationLoss, LossConfigError, LossInputs, check_bool, check_choice, check_number
from .cmkd_fused import cmkd_student_parts, rank_is_affine
from .functional import entropy, pearson, soft_rank, zscore

__all__ = ["CMKDLoss"]

_DIRECTIONS = ("low_entropy", "high_entropy")
_REGULARIZATIONS = ("l2", "kl")


class CMKDLoss(DistillationLoss):
    """CMKD: Pearson (values) + Spearman (ranks) correlation matching, weighted per sample by entropy.

    Per sample ``i`` with logits ``z_i`` (C classes) and ``zs(z) = (z - mean) / (std + 1e-7)``:

    - Pearson part: ``L_P,i = 1 - pearson(q_s,i, q_t,i)`` with ``q = softmax(zs(z) / T)``.
      z-scoring matters only *before* the softmax (it sets every sample's softmax sharpness, as in
      logit standardization); Pearson itself would ignore it.
    - Spearman part: ``L_S,i = 1 - pearson(soft_rank(zs(z_s,i)), soft_rank(zs(z_t,i)))`` with
      ``torchsort.soft_rank`` (Blondel et al. 2020); z-scoring first makes ``regularization_strength``
      independent of the logit scale.
    - Entropy weighting: ``H_i`` is the entropy of the teacher's prediction ``softmax(z_t,i)`` (T = 1:
      the teacher's own confidence, independent of the ablation switches) and ``H_bar`` its batch mean.
      Samples on the Spearman-heavy side get ``(w_S, w_P) = (w_major, w_minor)``, the others
      ``(w_minor, w_major)``. With ``spearman_heavy_when="low_entropy"`` the Spearman-heavy side is
      ``H_i < H_bar``; with ``"high_entropy"`` it is ``H_i > H_bar``; a sample exactly at the mean
      (e.g. a batch of one) is on the Pearson-heavy side.
    - ``loss = ce_weight * CE + scale * mean_i (w_P,i * L_P,i + w_S,i * L_S,i)``.

    Ablations (the paper's Table VI): every sample's part weights always sum to ``w_major + w_minor``,
    so rows differ in *what* is matched, not in loss scale:

    ========================  ======================================================================
    row                       configuration
    ========================  ======================================================================
    KL                        loss ``kd`` (CMKD replaces KD's KL; there is no KL inside ``cmkd``)
    Pearson                   ``use_zscore=False, use_spearman=False, entropy_weighting=False``
    Pearson + z-score         ``use_spearman=False, entropy_weighting=False``
    + Spearman                ``entropy_weighting=False`` (both parts at ``(w_major + w_minor) / 2``)
    + entropy weighting       defaults, with ``spearman_heavy_when`` = ``low_entropy`` / ``high_entropy``
    ========================  ======================================================================

    A single enabled part gets weight ``w_major + w_minor``; ``entropy_weighting`` needs both parts
    (it only redistributes weight between them) and at least one part must be on.

    Defaults and their provenance: ``T=4`` (CIFAR-100), ``scale=4`` (the paper tunes the scaling
    coefficient over 1..5 and reports 4 best), ``regularization="l2"`` with strength 1.0 (torchsort's
    default). What that strength means here: the l2 soft rank projects ``theta / strength`` onto the
    permutahedron, and a z-scored row with C >= 4 classes is already inside it at any strength
    >= 2 / sqrt(C), so the soft rank is then *exactly* affine in the z-scores and the Spearman part equals
    ``1 - pearson(z_s, z_t)``, the Pearson correlation of the logits rather than of their ranks (proof and
    property test: tests/test_losses_cmkd_rank.py). Ranks appear below the gaps between z-scored logits; on
    validation (benchmarks/ablation_cmkd.py, Fashion-MNIST, 3 seeds; numbers in BENCHMARKS.md) strengths 0.1
    and 0.01 (near-hard ranks) score below 1.0, so the default stays. Where the soft rank is affine (z-scored
    logits, l2, strength >= 2 / sqrt(C)) the student side runs fused (:mod:`.cmkd_fused`, equal to rounding).
    ``w_major=0.7, w_minor=0.3`` could not be confirmed from the paper. Its text is not consistent about
    which entropy side is Spearman-heavy, so that is a parameter. The data cannot choose it here: on the
    validation split (benchmarks/ablation_cmkd.py, 3 seeds, BENCHMARKS.md) ``low_entropy`` and
    ``high_entropy`` tie within noise, so the default stays ``high_entropy`` (a tie never flips a default).

    Parts: ``pearson`` = ``mean_i L_P,i`` and ``spearman`` = ``mean_i L_S,i`` (unweighted; only the
    enabled ones are reported).

    Args:
        T: softmax temperature of the Pearson part (> 0).
        scale: overall weight of the correlation term (>= 0).
        regularization: torchsort soft-rank regularization, ``"l2"`` or ``"kl"``.
        regularization_strength: soft-rank strength (> 0); smaller is closer to hard ranks.
        w_major: weight of the favoured part on a sample.
        w_minor: weight of the other part on that sample.
        spearman_heavy_when: ``"low_entropy"`` or ``"high_entropy"``: which side of the batch-mean
            teacher entropy gets ``w_major`` on the Spearman part.
        use_pearson: include the Pearson part.
        use_spearman: include the Spearman part.
        use_zscore: z-score logits before the softmax (Pearson) and before the soft rank (Spearman).
        entropy_weighting: per-sample weights from the teacher's entropy (else equal weights).
        ce_weight: weight of the cross-entropy term.
    """

    name = "cmkd"
    reads = frozenset({"teacher_features"})

    def __init__(
        self,
        T: float = 4.0,
        scale: float = 4.0,
        regularization: str = "l2",
        regularization_strength: float = 1.0,
        w_major: float = 0.7,
        w_minor: float = 0.3,
        spearman_heavy_when: str = "high_entropy",
        use_pearson: bool = True,
        use_spearman: bool = True,
        use_zscore: bool = True,
        entropy_weighting: bool = True,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(ce_weight)
        self.T = check_number("T", T, positive=True)
        self.scale = check_number("scale", scale, nonnegative=True)
        self.regularization = check_choice("regularization", regularization, _REGULARIZATIONS)
        self.regularization_strength = check_number("regularization_strength", regularization_strength, positive=True)
        self.w_major = check_number("w_major", w_major, nonnegative=True)
        self.w_minor = check_number("w_minor", w_minor, nonnegative=True)
        self.spearman_heavy_when = check_choice("spearman_heavy_when", spearman_heavy_when, _DIRECTIONS)
        self.use_pearson = check_bool("use_pearson", use_pearson)
        self.use_spearman = check_bool("use_spearman", use_spearman)
        self.use_zscore = check_bool("use_zscore", use_zscore)
        self.entropy_weighting = check_bool("entropy_weighting", entropy_weighting)
        if not (self.use_pearson or self.use_spearman):
            raise LossConfigError("cmkd needs use_pearson or use_spearman (for the KL baseline use loss 'kd')")
        if self.entropy_weighting and not (self.use_pearson and self.use_spearman):
            raise LossConfigError(
                "cmkd entropy_weighting redistributes weight between the Pearson and Spearman parts, so it needs "
                "use_pearson=True and use_spearman=True (set entropy_weighting=False for a single part)"
            )

    @property
    def feature_names(self) -> tuple[str, ...]:
        names = ("q",) if self.use_pearson else ()
        names += ("rank",) if self.use_spearman else ()
        return names + (("entropy",) if self.entropy_weighting else ())

    def teacher_features(self, teacher: Tensor) -> dict[str, Tensor]:
        """The teacher side of CMKD, a function of each teacher row alone (so the loader can precompute it):
        ``q`` = softmax(zs(z_t) / T) ``(B, C)``, ``rank`` = soft_rank(zs(z_t)) ``(B, C)``, ``entropy`` = H(softmax(z_t))
        ``(B,)`` (only the enabled parts). Together ~40% of the loss's time at C=100 (BENCHMARKS.md)."""
        feats: dict[str, Tensor] = {}
        with torch.no_grad():  # a fixed target: no autograd bookkeeping
            z_t = zscore(teacher) if self.use_zscore else teacher  # (B, C)
            if self.use_pearson:
                feats["q"] = (z_t / self.T).softmax(dim=1)  # (B, C)
            if self.use_spearman:
                feats["rank"] = soft_rank(z_t, self.regularization, self.regularization_strength).to(teacher.dtype)
            if self.entropy_weighting:
                feats["entropy"] = entropy(teacher)  # (B,) nats, teacher at T = 1
        return feats

    def part_weights(self, teacher: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample ``(w_P, w_S)``, each ``(B,)``, from the teacher logits ``(B, C)`` or their entropy ``h (B,)``."""
        B = teacher.shape[0]
        total = self.w_major + self.w_minor
        if not (self.use_pearson and self.use_spearman):
            # One part: it carries the whole per-sample weight (keeps ablation rows on one scale).
            w = teacher.new_full((B,), total)
            return (w, teacher.new_zeros(B)) if self.use_pearson else (teacher.new_zeros(B), w)
        if not self.entropy_weighting:
            half = teacher.new_full((B,), total / 2)
            return half, half
        h = entropy(teacher) if h is None else h  # (B,) nats, teacher at T = 1
        h_mean = h.mean()
        heavy = h < h_mean if self.spearman_heavy_when == "low_entropy" else h > h_mean  # (B,) Spearman-heavy
        w_s = torch.where(heavy, self.w_major, self.w_minor).to(teacher.dtype)
        w_p = torch.where(heavy, self.w_minor, self.w_major).to(teacher.dtype)
        return w_p, w_s

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        feats = inputs.features or self.teacher_features(teacher)  # resolved by forward; direct callers may omit
        w_p, w_s = self.part_weights(teacher, feats.get("entropy"))  # (B,), (B,)
        if self.fused(student.shape[1]):
            return self._distill_fused(student, feats, w_p, w_s)
        z_s = zscore(student) if self.use_zscore else student  # (B, C)
        per_sample = student.new_zeros(student.shape[0])  # (B,)
        parts: dict[str, Tensor] = {}
        if self.use_pearson:
            q_s = (z_s / self.T).softmax(dim=1)  # (B, C)
            l_p = 1.0 - pearson(q_s, feats["q"], dim=1)  # (B,)
            parts["pearson"] = l_p.mean()
            per_sample = per_sample + w_p * l_p
        if self.use_spearman:
            r_s = soft_rank(z_s, self.regularization, self.regularization_strength)  # (B, C)
            l_s = 1.0 - pearson(r_s, feats["rank"].to(r_s.dtype), dim=1)  # (B,)
            parts["spearman"] = l_s.mean()
            per_sample = per_sample + w_s * l_s.to(per_sample.dtype)
        return self.scale * per_sample.mean(), parts

    def fused(self, num_classes: int) -> bool:
        """Whether the student side runs as one fused node (:mod:`.cmkd_fused`): z-scored logits and an l2 soft
        rank that is exactly affine on them (strength >= 2 / sqrt(C)), i.e. CMKD's default from 4 classes on."""
        return (
            self.use_zscore
            and self.regularization == "l2"
            and rank_is_affine(num_classes, self.regularization_strength)
        )

    def _distill_fused(
        self, student: Tensor, feats: dict[str, Tensor], w_p: Tensor, w_s: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The same loss as the composed path, student side in one node (equal to rounding, tested)."""
        dtype = student.dtype
        q_t = feats["q"].to(dtype) if self.use_pearson else None  # (B, C)
        r_t = feats["rank"].to(dtype) if self.use_spearman else None  # (B, C)
        l_p, l_s = cmkd_student_parts(
            student, q_t, r_t, self.T, self.regularization_strength, self.use_pearson, self.use_spearman
        )  # (B,), (B,)
        parts: dict[str, Tensor] = {}
        if self.use_pearson:
            parts["pearson"] = l_p.mean()
        if self.use_spearman:
            parts["spearman"] = l_s.mean()
        return self.scale * (w_p * l_p + w_s * l_s).mean(), parts

    def hparams(self) -> dict[str, object]:
        return {
            "T": self.T,
            "scale": self.scale,
            "regularization": self.regularization,
            "regularization_strength": self.regularization_strength,
            "w_major": self.w_major,
            "w_minor": self.w_minor,
            "spearman_heavy_when": self.spearman_heavy_when,
            "use_pearson": self.use_pearson,
            "use_spearman": self.use_spearman,
            "use_zscore": self.use_zscore,
            "entropy_weighting": self.entropy_weighting,
            "ce_weight": self.ce_weight,
        }
