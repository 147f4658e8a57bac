"""Predictions over a whole split in index order, and the accuracy read off them.

The training loop uses these for its per-epoch held-out accuracy, `train_teacher` for the teacher's
own accuracy, and `pipeline.evaluation` for every test metric: one computation of each number.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.data.shards import Manifest
from pipeline.data.views import ViewRecipe
from pipeline.models.predict import model_device, to_input
from pipeline.training.dataset import DistillDataset
from pipeline.training.transport import make_loader


def held_out(manifest: Manifest, split: str, recipe: ViewRecipe | None = None) -> DistillDataset | None:
    """An unshuffled split for whole-split predictions on rank 0, or None when the data set has none.

    Its images go through `recipe`'s view 0, the evaluation transform (default: the plain image).
    """
    if split not in manifest.splits:
        return None
    return DistillDataset(manifest, split, shuffle=False, split_nodes=False, recipe=recipe)  # rank 0 evaluates it whole


@torch.inference_mode()
def predict_split(
    model: nn.Module, dataset: DistillDataset, batch_size: int, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` over a split in index order (no shuffle, view 0): logits (N, C) float32, labels (N,)."""
    if dataset.shuffle:
        raise ValueError("predict_split needs an unshuffled dataset (shuffle=False)")
    device = device or model_device(model)
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    n = dataset.num_samples()
    logits = np.empty((n, dataset.num_classes), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    dataset.set_epoch(0)
    for batch in make_loader(dataset, batch_size, workers=0):
        idx = batch["index"].numpy()
        x = to_input(batch["image"].to(device))
        logits[idx] = model(x).float().cpu().numpy()
        labels[idx] = batch["label"].numpy()
        seen[idx] = True
    model.train(was_training)
    if not seen.all():
        raise RuntimeError(f"predict_split: {int((~seen).sum())} of {n} samples never arrived")
    return logits, labels


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k largest logits (ties broken by class order)."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(1).mean())
