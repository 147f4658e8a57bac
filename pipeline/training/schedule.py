"""Optimizer and learning-rate schedule: SGD with momentum, linear warm-up, then cosine / step / constant.

`lr_at` is a small pure function of the fractional epoch (nanoGPT's `get_lr` shape), evaluated every step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import DEFAULT_EPOCHS, OptimConfig, TrainConfig


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


@dataclass(frozen=True)
class Schedule:
    """A training run's resolved length, recorded with its results (`to_dict`)."""

    steps: int  # optimizer steps in all
    steps_per_epoch: int  # of the epoch plan (the most batches any rank gets)
    samples_per_epoch: int  # over all ranks
    batch_size: int
    rule: str  # how the length was derived from the config
    asked_epochs: int | None = None  # the `epochs` of the config when `min_steps` raised them (None: not raised)

    @property
    def raised(self) -> bool:
        """`min_steps` made this run longer than the `epochs` its params ask for."""
        return self.asked_epochs is not None

    def announce(self, logger: logging.Logger, desc: str) -> None:
        """Log the resolved length: a WARNING when `min_steps` raised the epochs asked for, because the run then
        trains longer than its params say (`dvc exp run -S distill.train.epochs=1` trained 3 epochs, issue 32);
        an info line otherwise. The report's header lists such runs too (from the recorded `rule`)."""
        if not self.raised:
            logger.info("%s: %s", desc, self)
            return
        logger.warning(
            "%s: %s: min_steps raised the %d epoch(s) asked for; for exactly %d set min_steps: 0 (or steps: N for an "
            "exact step count)",
            desc,
            self,
            self.asked_epochs,
            self.asked_epochs,
        )

    @property
    def epochs(self) -> float:
        """Passes over the data (fractional when the step budget ends mid-epoch)."""
        return self.steps / self.steps_per_epoch

    @property
    def samples(self) -> int:
        """Training samples seen, over all ranks."""
        return round(self.samples_per_epoch * self.epochs)

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "steps": self.steps,
            "epochs": round(self.epochs, 4),
            "samples": self.samples,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.batch_size,
            "rule": self.rule,
        }

    def __str__(self) -> str:
        return (
            f"{self.steps:,} steps = {self.epochs:.2f} epochs of {self.steps_per_epoch:,} steps "
            f"(batch {self.batch_size}), {self.samples:,} samples seen [{self.rule}]"
        )


def resolve_schedule(cfg: TrainConfig, steps_per_epoch: int, samples_per_epoch: int) -> Schedule:
    """How long a run trains, from `train.steps` / `train.epochs` / `train.min_steps` and the data's size.

    The rule (documented in README "Schedules"):

    1. `steps: S` -> exactly S optimizer steps (the last epoch may end early);
    2. `epochs: E` (default 3) -> E full epochs, raised to at least `min_steps` steps: a data set too small
       for E epochs to reach the floor trains for more epochs, ceil(min_steps / steps_per_epoch), so the
       model gets a data-size-independent minimum of updates while large data sets keep their epochs.
       The rule then reads `epochs=E raised to R by min_steps=M` (the report finds raised runs by it:
       `pipeline.evaluation.study.RAISED_RULE`) and `Schedule.announce` logs it as a warning.
    """
    if steps_per_epoch < 1:
        raise ValueError("an epoch of the training source has no batches (empty split or budget?)")
    if cfg.steps is not None:
        return Schedule(cfg.steps, steps_per_epoch, samples_per_epoch, cfg.batch_size, f"steps={cfg.steps}")
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS
    if epochs * steps_per_epoch < cfg.min_steps:
        raised = math.ceil(cfg.min_steps / steps_per_epoch)
        rule = f"epochs={epochs} raised to {raised} by min_steps={cfg.min_steps}"
        return Schedule(raised * steps_per_epoch, steps_per_epoch, samples_per_epoch, cfg.batch_size, rule, epochs)
    return Schedule(epochs * steps_per_epoch, steps_per_epoch, samples_per_epoch, cfg.batch_size, f"epochs={epochs}")
