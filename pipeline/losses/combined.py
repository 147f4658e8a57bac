"""Weighted sums of distillation losses, e.g. ``dkd+cmkd`` (the CMKD paper's best combination)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .base import DistillationLoss, assemble, check_number, prepare_inputs, resolve_features

__all__ = ["CombinedLoss"]


class CombinedLoss(nn.Module):
    """``loss = ce_weight * CE + sum_k weight_k * distill_k`` over the components ``k``.

    Cross-entropy is counted ONCE: each component contributes only its distillation term (its own
    internal weights, e.g. DKD's alpha/beta/warm-up or CMKD's ``scale``, still apply), and the
    components' own CE weights (``kd``'s ``a``, the others' ``ce_weight``) are ignored. The single CE
    term's weight is ``weights["ce"]`` (default 1.0); each component's weight is ``weights[name]``
    (default 1.0).

    ``forward(student (B, C), teacher (B, C), target (B,), epoch=None, groups=None)``: ``epoch`` is
    passed to every component (DKD requires it), ``groups`` to the component that accepts explicit
    comparison groups (CKD). Output: ``loss``, ``ce``, and per component ``<name>`` (its weighted
    distillation total, before the combination weight) and ``<name>/<part>`` for its parts.
    """

    def __init__(self, components: Mapping[str, DistillationLoss], weights: Mapping[str, float], ce_weight: float):
        super().__init__()
        if len(components) < 2:
            raise ValueError("a combined loss needs at least two components")
        self.components = nn.ModuleDict(dict(components))
        self.weights = {
            name: check_number(f"weights.{name}", weights.get(name, 1.0), nonnegative=True) for name in components
        }
        self.ce_weight = check_number("weights.ce", ce_weight, nonnegative=True)

    @property
    def uses_teacher_features(self) -> bool:
        return any(c.uses_teacher_features for c in self.components.values())

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"{n}.{k}" for n, c in self.components.items() for k in c.feature_names)

    def teacher_features(self, teacher: Tensor) -> dict[str, Tensor]:
        """Every component's :meth:`DistillationLoss.teacher_features`, keys prefixed ``<component>.``."""
        return {f"{n}.{k}": v for n, c in self.components.items() for k, v in c.teacher_features(teacher).items()}

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        epoch: float | None = None,
        groups: Tensor | None = None,
        teacher_features: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        student, teacher, target = prepare_inputs(student_logits, teacher_logits, target)
        features = resolve_features(self, teacher, teacher_features) if self.uses_teacher_features else {}
        if groups is not None and not any(c.accepts_groups for c in self.components.values()):
            raise ValueError(f"groups were given but no component of {'+'.join(self.components)} uses them")
        total = student.new_zeros(())
        parts: dict[str, Tensor] = {}
        for name, component in self.components.items():
            if component.accepts_groups:
                value, comp_parts = component.distill(student, teacher, target, epoch, groups=groups)
            elif component.uses_teacher_features:
                mine = {k.split(".", 1)[1]: v for k, v in features.items() if k.startswith(f"{name}.")}
                value, comp_parts = component.distill(student, teacher, target, epoch, features=mine)
            else:
                value, comp_parts = component.distill(student, teacher, target, epoch)
            total = total + self.weights[name] * value
            parts[name] = value
            parts.update({f"{name}/{key}": part for key, part in comp_parts.items()})
        return assemble(student, target, self.ce_weight, total, parts)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, ce_weight={self.ce_weight}"
