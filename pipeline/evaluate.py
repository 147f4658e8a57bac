"""Test-split evaluation: predictions in index order and the metrics computed from them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.loader import DistillDataset, batch_to_float, make_loader


@torch.inference_mode()
def predict_split(
    model: nn.Module, dataset: DistillDataset, batch_size: int, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` over a split in index order (no shuffle, view 0): logits (N, C) float32, labels (N,)."""
    if dataset.shuffle:
        raise ValueError("predict_split needs an unshuffled dataset (shuffle=False)")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    n = dataset.num_samples()
    logits = np.empty((n, dataset.num_classes), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    dataset.set_epoch(0)
    for batch in make_loader(dataset, batch_size, workers=0):
        idx = batch["index"].numpy()
        x = batch_to_float(batch["image"].to(device))
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


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement between two sets of logits (N, C)."""
    return float((a.argmax(1) == b.argmax(1)).mean())


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    p = softmax(logits.astype(np.float64))
    conf = p.max(1)
    correct = p.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # bin b = (edges[b], edges[b+1]]
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)
