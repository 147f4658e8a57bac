"""Models as the pipeline uses them: zoo network + the data set's normalisation, saved with its identity.

Inputs everywhere in kdcache are float images in [0, 1] (`views.to_tensor`); each model carries its
own per-channel normalisation (the training split's mean/std from the manifest) as buffers, so a
checkpoint is self-contained and a teacher and a student can never disagree on preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models import build_model, load_checkpoint, load_state_dict_checkpoint, save_checkpoint
from pipeline.shards import Manifest


class Normalized(nn.Module):
    """`net((x - mean) / std)` for x (B, C, H, W) in [0, 1]."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_for(arch: str, manifest: Manifest) -> Normalized:
    """A freshly initialised `arch` sized for the data set (classes, channels) with its normalisation."""
    h, w, c = manifest.image_shape
    return Normalized(build_model(arch, manifest.num_classes, c), manifest.mean, manifest.std)


def save(path: str | Path, model: Normalized, arch: str, extra: dict[str, Any] | None = None) -> None:
    """Checkpoint: the bare net's state_dict + arch + normalisation + `extra` (e.g. test accuracy)."""
    net = model.net
    meta = {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), **(extra or {})}
    num_classes = meta.pop("num_classes", None) or _out_features(net)
    in_channels = int(model.mean.numel())
    save_checkpoint(path, net, arch=arch, num_classes=num_classes, in_channels=in_channels, extra=meta)


def _out_features(net: nn.Module) -> int:
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)


def load(
    path: str | Path, expected_arch: str | None = None, manifest: Manifest | None = None
) -> tuple[Normalized, dict]:
    """Load a kdcache checkpoint; with `manifest`, check classes/channels fit the data set."""
    net, meta = load_checkpoint(path, expected_arch=expected_arch)
    if manifest is not None:
        check_fits(meta, manifest, path)
    mean = meta.get("mean") or (manifest.mean if manifest else None)
    std = meta.get("std") or (manifest.std if manifest else None)
    if mean is None:
        raise ValueError(f"{path}: checkpoint has no normalisation (mean/std); pass the data set's manifest")
    return Normalized(net, mean, std), meta


def import_state_dict(path: str | Path, arch: str, manifest: Manifest) -> Normalized:
    """A user's bare `state_dict` for `arch` (e.g. a published teacher), normalised with the data set's stats."""
    h, w, c = manifest.image_shape
    net = load_state_dict_checkpoint(path, arch=arch, num_classes=manifest.num_classes, in_channels=c)
    return Normalized(net, manifest.mean, manifest.std)


def check_fits(meta: dict, manifest: Manifest, path: str | Path) -> None:
    c = manifest.image_shape[2]
    if meta.get("num_classes") != manifest.num_classes or meta.get("in_channels") != c:
        raise ValueError(
            f"checkpoint {path} is for {meta.get('num_classes')} classes x {meta.get('in_channels')} channels, "
            f"but data set {manifest.dataset} has {manifest.num_classes} classes x {c} channels"
        )
