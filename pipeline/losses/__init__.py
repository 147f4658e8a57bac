"""Distillation losses and their registry.

``build_loss(name, **params)`` turns a ``params.yaml`` loss section into a module::

    build_loss("kd", T=4, a=0.1, b=0.9)
    build_loss("dkd+cmkd", dkd={"beta": 8}, cmkd={"scale": 4}, weights={"dkd": 1.0, "cmkd": 0.5, "ce": 1.0})

Every module's ``forward(student_logits (B, C), teacher_logits (B, C), target (B,), epoch=None, *,
groups=None, teacher_features=None, members=None)`` returns ``{"loss": total incl. CE, "ce": ..., <parts>}``
(see :class:`base.DistillationLoss`: one call contract; a loss reads the optional inputs in its ``reads``
and refuses the others). A ``+``-joined name builds a :class:`combined.CombinedLoss` that counts
cross-entropy once and hands every input to every component.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from .base import OPTIONAL_INPUTS, DistillationLoss, LossConfigError, LossInputs, check_label_smoothing
from .ce import CELoss
from .ckd import CKDLoss
from .cmkd import CMKDLoss
from .combined import CombinedLoss
from .dist import DISTLoss
from .dkd import DKDLoss
from .kd import KDLoss
from .lskd import LSKDLoss
from .mtkd import MTKDLoss

__all__ = [
    "LOSSES",
    "OPTIONAL_INPUTS",
    "CELoss",
    "CKDLoss",
    "CMKDLoss",
    "CombinedLoss",
    "DISTLoss",
    "DKDLoss",
    "DistillationLoss",
    "KDLoss",
    "LSKDLoss",
    "LossConfigError",
    "LossInputs",
    "MTKDLoss",
    "build_loss",
    "default_params",
]

LOSSES: dict[str, type[nn.Module]] = {
    cls.name: cls for cls in (CELoss, KDLoss, DKDLoss, DISTLoss, CMKDLoss, CKDLoss, LSKDLoss, MTKDLoss)
}


def default_params(name: str) -> dict[str, Any]:
    """The constructor parameters of a single loss with their defaults (for config docs/templates)."""
    cls = _loss_class(name)
    return {**{key: p.default for key, p in _parameters(cls).items()}, SMOOTHING: 0.0}


def build_loss(name: str, **params: Any) -> nn.Module:
    """Build a loss by registry name, with exactly its parameters.

    ``name`` is one of :data:`LOSSES` or several joined by ``+`` (e.g. ``"dkd+cmkd"``). For a
    combination, ``params`` maps each component name to its own parameter dict (omitted: defaults)
    plus an optional ``weights`` dict ``{component: w, "ce": w_ce}`` (each default 1.0); see
    :class:`CombinedLoss` for the semantics (CE counted once, with weight ``weights["ce"]``). Every loss, and a
    combination at its top level, also takes ``label_smoothing`` (its CE term's epsilon, default 0).

    Raises:
        LossConfigError (a ValueError): unknown loss name (the message lists the available ones).
        LossConfigError (a TypeError and a ValueError): unknown or invalid parameters (the message
            lists the valid ones).
    """
    if not isinstance(name, str) or not name.strip():
        raise LossConfigError(f"loss name must be a non-empty string, got {name!r}; available: {sorted(LOSSES)}")
    if "+" in name:
        return _build_combined(name, params)
    cls = _loss_class(name.strip())
    own = {k: v for k, v in params.items() if k != SMOOTHING}
    _check_keys(f"loss '{name}'", own, [*_parameters(cls), SMOOTHING])
    return _smoothed(cls(**own), params)


#: The key every loss takes besides its own parameters: its CE term's label smoothing (DistillationLoss).
SMOOTHING = "label_smoothing"


def _smoothed(loss: DistillationLoss, params: Mapping[str, Any]) -> DistillationLoss:
    """``loss`` with its CE term's ``label_smoothing`` from ``params`` (default 0: plain CE)."""
    if SMOOTHING in params:
        loss.label_smoothing = check_label_smoothing(params[SMOOTHING])
    return loss


def _loss_class(name: str) -> type[nn.Module]:
    if name not in LOSSES:
        raise LossConfigError(f"unknown loss {name!r}; available: {sorted(LOSSES)}")
    return LOSSES[name]


def _parameters(cls: type[nn.Module]) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {k: p for k, p in sig.parameters.items() if k != "self"}


def _check_keys(what: str, given: Mapping[str, Any], valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise LossConfigError(f"unknown parameter(s) {unknown} for {what}; valid parameters: {sorted(valid)}")


def _build_combined(name: str, params: Mapping[str, Any]) -> CombinedLoss:
    names = [part.strip() for part in name.split("+")]
    for part in names:
        _loss_class(part)
    if len(set(names)) != len(names):
        raise LossConfigError(f"loss {name!r} repeats a component")
    if "ce" in names:
        raise LossConfigError(
            f"loss {name!r}: 'ce' cannot be a component, every combination already has one CE term "
            "(set its weight with weights={'ce': w})"
        )
    _check_keys(f"loss '{name}'", params, [*names, "weights", SMOOTHING])
    weights = params.get("weights") or {}
    if not isinstance(weights, Mapping):
        raise LossConfigError(f"weights of loss {name!r} must be a mapping, got {weights!r}")
    _check_keys(f"the weights of loss '{name}'", weights, [*names, "ce"])
    components = {}
    for part in names:
        sub = params.get(part) or {}
        if not isinstance(sub, Mapping):
            raise LossConfigError(f"parameters of component {part!r} must be a mapping, got {sub!r}")
        if SMOOTHING in sub:  # the combination's one CE term is the only one computed
            raise LossConfigError(
                f"loss {name!r}: {SMOOTHING} belongs to the combination (its one CE term), not to component {part!r}"
            )
        components[part] = build_loss(part, **sub)
    combined = CombinedLoss(components, {k: v for k, v in weights.items() if k != "ce"}, weights.get("ce", 1.0))
    return _smoothed(combined, params)
