"""Models at inference: the one input conversion and a batched forward pass over in-memory images.

Every image in kdcache travels as uint8 ``(H, W, C)`` (shards, views, the student loader); a model sees
float ``(B, C, H, W)`` in [0, 1] in channels_last memory (the permute of a ``(B, H, W, C)`` tensor already
is), and normalises it itself (:class:`~pipeline.models.registry.Normalized`). :func:`to_input` is that
conversion, used by the teacher's cache pass, the training loop and evaluation alike.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["predict_arrays", "to_input"]


def to_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1] (channels_last strides, no copy of the layout)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return images.permute(0, 3, 1, 2).float().div_(255.0)


@torch.inference_mode()
def predict_arrays(
    model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device | None = None
) -> np.ndarray:
    """Logits (N, C) float32 of ``model`` on in-memory (or memory-mapped) uint8 images (N, H, W, C).

    Batches of ``batch_size``; the model is put in eval mode for the pass and restored after. The same
    preprocessing as the shard path (:func:`to_input`), so a teacher's cached logits and a student's
    evaluation see identical inputs.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start : start + batch_size], copy=True))  # mmap slices are read-only
        out.append(model(to_input(x.to(device, non_blocking=True))).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.empty((0, 0), dtype=np.float32)
