"""Weighted sums of distillation losses, e.g. ``dkd+cmkd`` (the CMKD paper's best combination)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor, nn

from .base import DistillationLoss, LossInputs, check_number

__all__ = ["CombinedLoss"]


class CombinedLoss(DistillationLoss):
    """``loss = ce_weight * CE + sum_k weight_k * distill_k`` over the components ``k``.

    Cross-entropy is counted ONCE: each component contributes only its distillation term (its own
    internal weights, e.g. DKD's alpha/beta/warm-up or CMKD's ``scale``, still apply), and the
    components' own CE weights (``kd``'s ``a``, the others' ``ce_weight``) are ignored. The single CE
    term's weight is ``weights["ce"]`` (default 1.0); each component's weight is ``weights[name]``
    (default 1.0).

    ``forward`` is every loss's (:class:`DistillationLoss`): the combination reads the union of its
    components' optional inputs (an input no component uses is an error) and passes all of them to
    every component, which reads what it needs (``epoch`` for DKD, ``groups`` for CKD, its own
    teacher features, ``members`` for MTKD). Output: ``loss``, ``ce``, and per component ``<name>`` (its
    weighted distillation total, before the combination weight) and ``<name>/<part>`` for its parts.
    """

    def __init__(self, components: Mapping[str, DistillationLoss], weights: Mapping[str, float], ce_weight: float):
        super().__init__(ce_weight, ce_param="weights.ce")
        if len(components) < 2:
            raise ValueError("a combined loss needs at least two components")
        self.components = nn.ModuleDict(dict(components))
        self.weights = {
            name: check_number(f"weights.{name}", weights.get(name, 1.0), nonnegative=True) for name in components
        }

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(self.components)

    @property
    def reads(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(c.reads for c in self.components.values()))

    @property
    def mixes(self) -> bool:  # type: ignore[override]
        return all(c.mixes for c in self.components.values())

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"{n}.{k}" for n, c in self.components.items() for k in c.feature_names)

    def teacher_features(self, teacher: Tensor) -> dict[str, Tensor]:
        """Every component's :meth:`DistillationLoss.teacher_features`, keys prefixed ``<component>.``."""
        return {f"{n}.{k}": v for n, c in self.components.items() for k, v in c.teacher_features(teacher).items()}

    def distill(
        self, student: Tensor, teacher: Tensor, target: Tensor, inputs: LossInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        total = student.new_zeros(())
        parts: dict[str, Tensor] = {}
        for name, component in self.components.items():
            mine = {k.split(".", 1)[1]: v for k, v in inputs.features.items() if k.startswith(f"{name}.")}
            value, comp_parts = component.distill(student, teacher, target, dataclasses.replace(inputs, features=mine))
            total = total + self.weights[name] * value
            parts[name] = value
            parts.update({f"{name}/{key}": part for key, part in comp_parts.items()})
        return total, parts

    def extra_repr(self) -> str:
        smoothing = f", label_smoothing={self.label_smoothing!r}" if self.label_smoothing else ""
        return f"weights={self.weights}, ce_weight={self.ce_weight}{smoothing}"
