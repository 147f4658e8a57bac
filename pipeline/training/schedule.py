"""Optimizer and learning-rate schedule: SGD with momentum, linear warm-up, then cosine / step / constant.

`lr_at` is a small pure function of the fractional epoch (nanoGPT's `get_lr` shape), evaluated every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import OptimConfig


def lr_at(cfg: OptimConfig, epoch: float, total_epochs: int) -> float:
    """Learning rate at fractional `epoch`: 1) linear warm-up, 2) the named schedule over the rest."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(total_epochs - cfg.warmup_epochs, 1e-8)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (epoch - cfg.warmup_epochs) / span)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown lr schedule '{cfg.schedule}'; available: ['cosine', 'step', 'constant']")


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD over the model's parameters; no weight decay on BatchNorm/bias parameters (decaying them only hurts)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
