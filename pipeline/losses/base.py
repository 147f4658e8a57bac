"""Shared skeleton of every distillation loss: input checks, dtype policy, CE term, output dict.

A loss is ``ce_weight * CE(student, target) + distillation(student, teacher)``. Subclasses implement
only :meth:`DistillationLoss.distill`, which returns the *weighted* distillation total and its
*unweighted* named parts; :meth:`DistillationLoss.forward` adds the cross-entropy term and assembles
the output. Keeping CE out of ``distill`` is what lets a combination (``dkd+cmkd``) count CE once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import compute_dtype

__all__ = [
    "OPTIONAL_INPUTS",
    "DistillationLoss",
    "LossConfigError",
    "LossInputs",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
]


class LossConfigError(TypeError, ValueError):
    """A loss was configured with unknown or invalid parameters.

    Subclasses both TypeError (what Python raises for an unexpected keyword) and ValueError (what a
    config reader expects for a bad value), so callers may catch either.
    """


def check_number(name: str, value: object, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Validate a finite real hyperparameter; bools are rejected (``T: true`` in YAML is a typo)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LossConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise LossConfigError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise LossConfigError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise LossConfigError(f"{name} must be >= 0, got {value!r}")
    return value


def check_label_smoothing(value: object) -> float:
    """Validate ``label_smoothing`` (the CE term's epsilon, Szegedy et al. 2016): a number in [0, 1)."""
    value = check_number("label_smoothing", value, nonnegative=True)
    if value >= 1:
        raise LossConfigError(f"label_smoothing must be < 1, got {value!r}")
    return value


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Validate an integer hyperparameter ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LossConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise LossConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Validate a boolean switch."""
    if not isinstance(value, bool):
        raise LossConfigError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Validate a string option against its allowed values."""
    if value not in choices:
        raise LossConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


#: The optional inputs of a loss call besides (student, teacher, target, epoch); a loss lists the ones it
#: uses in :attr:`DistillationLoss.reads` and any other one given is an error (never silently dropped).
OPTIONAL_INPUTS = ("groups", "teacher_features", "members")


@dataclass(frozen=True)
class LossInputs:
    """What :meth:`DistillationLoss.distill` may read besides the logits and the target.

    Every loss receives the same object (one call contract) and reads only what it needs:

    - ``epoch``: fractional epoch of the training clock (DKD's warm-up); every loss accepts it.
    - ``groups``: ``(G, k)`` explicit comparison row indices (CKD), or None (the loss samples its own).
    - ``features``: the loss's :meth:`DistillationLoss.teacher_features` of these teacher logits,
      precomputed (e.g. by the loader) or computed by ``forward``; ``{}`` for a loss without features.
    - ``members``: ``(B, M, C)`` logits of the M member teachers of an ensemble teacher (compute dtype,
      detached), or None (a single-teacher store).
    """

    epoch: float | None = None
    groups: Tensor | None = None
    features: Mapping[str, Tensor] = field(default_factory=dict)
    members: Tensor | None = None


class DistillationLoss(nn.Module):
    """Base class: ``loss = ce_weight * CE + distill(...)``.

    ``forward(student_logits (B, C), teacher_logits (B, C), target (B,) int64, epoch=None, *, groups=None,
    teacher_features=None, members=None)`` returns ``{"loss": total (carries the graph), "ce": CE, **parts}``
    for every loss (one contract: the training loop and combinations call all losses alike). A loss reads
    the optional inputs named in :attr:`reads`; any other optional input given (not None) is an error, so a
    caller never believes an input was used when it was not. All parts are detached scalars meant
    for logging and are *unweighted* (e.g. ``kd`` is ``T^2 * KL`` before the ``b`` weight), so curves
    stay comparable across weightings; only ``loss`` includes the weights.

    Dtype policy: inputs are promoted to at least float32 before any math (float16/bfloat16 logits
    are common when the teacher cache is stored in half precision); float64 stays float64.
    The teacher logits (and member logits) are always detached: the teacher is a fixed target.

    Every loss's CE term takes ``label_smoothing`` (set by ``build_loss(name, label_smoothing=eps)``, the key
    every ``distill.loss_params.<loss>`` accepts; default 0): a comparison with smoothing on smooths every
    loss's CE alike, and the smoothing is the loss's, recorded with its parameters.
    """

    #: registry name, set by subclasses
    name: ClassVar[str] = ""
    #: the optional inputs (of :data:`OPTIONAL_INPUTS`) :meth:`distill` reads
    reads: ClassVar[frozenset[str]] = frozenset()
    #: whether the loss works on mixed images (Mixup/CutMix views: two labels): its distillation term never reads
    #: the hard target (DKD's target/non-target split and MTKD's per-member CE do, so they cannot)
    mixes: ClassVar[bool] = True

    def __init__(self, ce_weight: float, ce_param: str = "ce_weight") -> None:
        super().__init__()
        # ce_param: the subclass's own name for the CE weight (kd calls it ``a``), for error messages
        self.ce_weight = check_number(ce_param, ce_weight, nonnegative=True)
        self.label_smoothing = 0.0  # the CE term's epsilon (see the class docstring)

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(weighted distillation total, unweighted named parts)``; no CE term.

        ``student``/``teacher`` arrive promoted to the compute dtype, ``teacher`` detached; ``inputs`` holds
        the optional inputs (see :class:`LossInputs`), already checked against :attr:`reads`.
        """
        raise NotImplementedError

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The keys :meth:`teacher_features` returns (with this configuration)."""
        return ()

    def teacher_features(self, teacher: Tensor) -> dict[str, Tensor]:
        """Per-sample quantities that depend on the teacher logits alone, each ``(B, ...)``.

        ``teacher (B, C)`` in the compute dtype. Because the teacher is a fixed target, these can be
        computed away from the training step (the data loader's worker does it for cached logits, see
        ``pipeline.training.dataset``) and handed to :meth:`forward` as ``teacher_features``; row ``i`` of every
        feature depends on row ``i`` of ``teacher`` only, so features can be batched and masked like
        the logits. The default loss has none.
        """
        return {}

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        epoch: float | None = None,
        *,
        groups: Tensor | None = None,
        teacher_features: Mapping[str, Tensor] | None = None,
        members: Tensor | None = None,
        mix: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """See the class docstring. ``groups``: ``(G, k)`` comparison row indices; ``teacher_features``:
        :meth:`teacher_features` of these teacher logits computed elsewhere (e.g. by the loader; omitted, they
        are computed here, with equal results); ``members``: ``(B, M, C)`` member-teacher logits; ``mix``:
        ``(target2 (B,), lam (B,))`` of mixed images (Mixup/CutMix views), for the CE term (see `assemble`)."""
        if mix is not None and not self.mixes:
            raise ValueError(
                f"loss {self.name!r} reads the hard target, which a mixed image (Mixup/CutMix) does not have: "
                "use a store without mixing, or a loss that mixes (ce, kd, dist, cmkd, ckd, lskd)"
            )
        student, teacher, target = prepare_inputs(student_logits, teacher_logits, target)
        inputs = gather_inputs(self, teacher, epoch, groups=groups, teacher_features=teacher_features, members=members)
        total, parts = self.distill(student, teacher, target, inputs)
        return assemble(student, target, self.ce_weight, total, parts, self.label_smoothing, mix)

    def extra_repr(self) -> str:
        smoothing = {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}  # shown when set
        return ", ".join(f"{k}={v!r}" for k, v in {**self.hparams(), **smoothing}.items())

    def hparams(self) -> dict[str, object]:
        """The constructor parameters, for logging."""
        return {}


def gather_inputs(
    loss: nn.Module,
    teacher: Tensor,
    epoch: float | None,
    *,
    groups: Tensor | None,
    teacher_features: Mapping[str, Tensor] | None,
    members: Tensor | None,
) -> LossInputs:
    """The :class:`LossInputs` of one call: inputs the loss cannot use are an error naming them, the loss's
    teacher features resolved (given ones checked, missing ones computed), member logits checked and promoted.

    An empty ``teacher_features`` mapping means "none" (what the loader sends for a loss without features).
    """
    reads = loss.reads
    given = {"groups": groups, "teacher_features": teacher_features or None, "members": members}
    unusable = sorted(k for k, v in given.items() if v is not None and k not in reads)
    if unusable:
        who = getattr(loss, "name", "") or type(loss).__name__
        raise ValueError(
            f"loss {who!r} cannot use {unusable} (it reads {sorted(reads) or 'none of the optional inputs'}); "
            f"pass them only to a loss that uses them: groups (ckd), teacher_features (cmkd), members (mtkd)"
        )
    features = resolve_features(loss, teacher, teacher_features) if "teacher_features" in reads else {}
    return LossInputs(epoch, groups, features, None if members is None else prepare_members(members, teacher))


def prepare_members(members: Tensor, teacher: Tensor) -> Tensor:
    """Check member logits ``(B, M, C)`` against the teacher's ``(B, C)``; promote to its dtype, detach."""
    B, C = teacher.shape
    if members.dim() != 3 or members.shape[0] != B or members.shape[2] != C or members.shape[1] < 1:
        raise ValueError(
            f"members must be (B, M, C) = ({B}, M >= 1, {C}) member-teacher logits, got shape {tuple(members.shape)}"
        )
    return members.detach().to(device=teacher.device, dtype=teacher.dtype)  # (B, M, C)


def resolve_features(loss: nn.Module, teacher: Tensor, given: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``loss.teacher_features(teacher)``, or the precomputed ``given`` checked against it (keys, batch size)."""
    if given is None:
        return loss.teacher_features(teacher)
    missing = set(loss.feature_names) - set(given)
    if missing:
        who = getattr(loss, "name", "") or type(loss).__name__
        raise ValueError(f"teacher_features for {who} lack {sorted(missing)} (got {sorted(given)})")
    out = {}
    for k in loss.feature_names:
        v = given[k]
        if v.shape[0] != teacher.shape[0]:
            raise ValueError(f"teacher_features[{k!r}] has {v.shape[0]} rows for a batch of {teacher.shape[0]}")
        out[k] = v.to(device=teacher.device, dtype=teacher.dtype if v.is_floating_point() else v.dtype)
    return out


def mixed_cross_entropy(
    student: Tensor, target: Tensor, mix: tuple[Tensor, Tensor] | None, label_smoothing: float = 0.0
) -> Tensor:
    """Batch-mean CE of ``student (B, C)`` against ``target (B,)``, or the mixed target ``mix = (y2 (B,), lam (B,))``.

    Without ``mix`` it is ``F.cross_entropy`` itself (bit for bit); the training loop's CE-only rows use it too.
    """
    if mix is None:
        return F.cross_entropy(student, target, label_smoothing=label_smoothing)
    y2, lam = mix
    lam = lam.to(student.dtype)
    own = F.cross_entropy(student, target, label_smoothing=label_smoothing, reduction="none")  # (B,)
    other = F.cross_entropy(student, y2.long(), label_smoothing=label_smoothing, reduction="none")  # (B,)
    return (lam * own + (1 - lam) * other).mean()


def prepare_inputs(student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes, promote to the compute dtype, detach the teacher. Returns (student, teacher, target)."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (B, C), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {tuple(student_logits.shape)}"
        )
    if target.shape != student_logits.shape[:1]:
        raise ValueError(f"target must be (B,) = ({student_logits.shape[0]},), got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    dtype = compute_dtype(student_logits.dtype)
    student = student_logits.to(dtype)  # (B, C); .to keeps the graph back to a half-precision input
    teacher = teacher_logits.detach().to(dtype)  # (B, C)
    return student, teacher, target.long()


def assemble(
    student: Tensor,
    target: Tensor,
    ce_weight: float,
    distill_total: Tensor,
    parts: dict[str, Tensor],
    label_smoothing: float = 0.0,
    mix: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{"loss": ce_weight * CE + distill_total, "ce": CE, **parts}`` with detached parts.

    CE with label smoothing epsilon (Szegedy et al. 2016, "Rethinking the Inception architecture"):
    ``CE = -mean_i [(1 - eps) log p_i[y_i] + eps / C * sum_c log p_i[c]]``; eps = 0 is plain CE, bit for bit.
    With ``mix = (y2, lam)`` (mixed images): ``CE = mean_i [lam_i CE_i(y_i) + (1 - lam_i) CE_i(y2_i)]``, the
    Mixup/CutMix target (Zhang et al. 2018; Yun et al. 2019).
    """
    ce = mixed_cross_entropy(student, target, mix, label_smoothing)  # scalar, batch mean
    out = {"loss": ce_weight * ce + distill_total, "ce": ce.detach()}
    for key, value in parts.items():
        out[key] = value.detach()
    return out
