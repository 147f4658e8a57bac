"""Models at inference: the one input conversion and a batched forward pass over in-memory images.

Every image in kdcache travels as uint8 ``(H, W, C)`` (shards, views, the student loader); a model sees
float ``(B, C, H, W)`` in [0, 1] in channels_last memory (the permute of a ``(B, H, W, C)`` tensor already
is), and normalises it itself (:class:`~pipeline.models.registry.Normalized`). :func:`to_input` is that
conversion, used by the teacher's cache pass, the training loop and evaluation alike.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

__all__ = ["classifier_layer", "model_device", "predict_arrays", "predict_features", "to_input"]

#: attribute names under which classifiers keep their last layer: the zoo's and torchvision's (`fc`, `classifier`,
#: `linear`, `head`, `heads`); timm models say it themselves (`get_classifier()`)
CLASSIFIER_NAMES = ("fc", "classifier", "linear", "head", "heads")


def to_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1] (channels_last strides, no copy of the layout)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: its first parameter's device, else its first buffer's (a model file's program, the
    normalisation's mean/std), else the CPU."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.inference_mode()
def predict_arrays(
    model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device | None = None
) -> np.ndarray:
    """Logits (N, C) float32 of ``model`` on in-memory (or memory-mapped) uint8 images (N, H, W, C).

    Batches of ``batch_size``; the model is put in eval mode for the pass and restored after. The same
    preprocessing as the shard path (:func:`to_input`), so a teacher's cached logits and a student's
    evaluation see identical inputs.
    """
    device = device or model_device(model)
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start : start + batch_size], copy=True))  # mmap slices are read-only
        out.append(model(to_input(x.to(device, non_blocking=True))).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.empty((0, 0), dtype=np.float32)


def classifier_layer(model: nn.Module) -> nn.Linear | None:
    """The final `nn.Linear` of a classifier (whose *input* is the penultimate features), or None when there is none
    to identify: a model behind `Normalized` is looked up in its `net`; timm's `get_classifier()`, else the first of
    `CLASSIFIER_NAMES` that is an attribute, the last `nn.Linear` of it when it is a block (`nn.Sequential` heads)."""
    net = getattr(model, "net", model)
    get = getattr(net, "get_classifier", None)
    head = get() if callable(get) else next((getattr(net, n) for n in CLASSIFIER_NAMES if hasattr(net, n)), None)
    if isinstance(head, nn.Module) and not isinstance(head, nn.Linear):
        head = next((m for m in reversed(list(head.modules())) if isinstance(m, nn.Linear)), None)
    return head if isinstance(head, nn.Linear) else None


def predict_features(
    model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`predict_arrays`' logits (N, C) and the penultimate features (N, D): the input of `classifier_layer`, caught
    by a forward hook on it. A model without an identifiable classifier is a `ValueError`."""
    layer = classifier_layer(model)
    if layer is None:
        raise ValueError(f"{type(getattr(model, 'net', model)).__name__} has no identifiable classifier layer")
    feats: list[np.ndarray] = []
    hook = layer.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach().float().cpu().numpy()))
    try:
        logits = predict_arrays(model, images, batch_size, device)
    finally:
        hook.remove()
    d = layer.in_features
    return logits, (np.concatenate(feats).reshape(len(images), d) if feats else np.empty((0, d), np.float32))
