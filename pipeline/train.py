"""One plain training loop for teachers and students alike.

SGD (momentum, optional Nesterov) with weight decay, linear warm-up then cosine / step / constant
learning-rate schedule evaluated per step, optional gradient clipping, bf16 autocast on CUDA and
channels_last memory format everywhere. Every epoch ends with a checkpoint (`last.pt`: model, optimizer, epoch,
history, loss-sampler state) written atomically, so `resume=True` continues an interrupted run to
the same weights as an uninterrupted one with the same seed (the data stream is a pure function of
`(seed, epoch)`).

Teacher logits come from the batch (`"logits"`, cached) or from a live `teacher` module (online
mode, for comparison); the student never sees a teacher object in cache mode.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import OptimConfig, TrainConfig
from pipeline.evaluate import predict_split, topk_accuracy
from pipeline.loader import DistillDataset, batch_to_float, make_loader

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


def lr_at(cfg: OptimConfig, epoch: float, total_epochs: int) -> float:
    """Learning rate at fractional `epoch`: linear warm-up, then the named schedule."""
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
    # No weight decay on BatchNorm/bias parameters (standard practice; decaying them only hurts).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _loss_state(loss_fn: nn.Module) -> dict[str, Any]:
    """Sampler state of losses that draw randomness (CKD's groups), so resume replays it exactly."""
    gens = {name: m.generator.get_state() for name, m in loss_fn.named_modules() if isinstance(getattr(m, "generator", None), torch.Generator)}
    return {"generators": gens}


def _load_loss_state(loss_fn: nn.Module, state: dict[str, Any]) -> None:
    mods = dict(loss_fn.named_modules())
    for name, s in state.get("generators", {}).items():
        mods[name].generator.set_state(s)


def train(
    model: nn.Module,
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    train_set: DistillDataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    test_set: DistillDataset | None = None,
    device: torch.device | None = None,
    resume: bool = False,
    teacher: nn.Module | None = None,
    desc: str = "train",
    stop_after_epoch: int | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place; returns the per-epoch history (also written to `out_dir/history.json`).

    loss_fn(student (B, C), teacher (B, C), target (B,), epoch=float) -> {"loss": ..., parts...}.
    `stop_after_epoch` ends the run early after that epoch (used to test resume).
    """
    device = device or torch.device("cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    # channels_last on CPU too: ~1.6x faster convolutions and pooling here (oneDNN), and our
    # (B, H, W, C) -> (B, C, H, W) conversion already yields channels_last inputs.
    model.to(device, memory_format=torch.channels_last)
    if teacher is not None:
        teacher.eval().to(device)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    opt = make_optimizer(model, cfg.optim)
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint {ckpt_path} to resume from (run without --resume)")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if isinstance(loss_fn, nn.Module):
            _load_loss_state(loss_fn, state.get("loss", {}))
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        log.info("resumed %s at epoch %d", ckpt_path, start_epoch)
    else:
        torch.manual_seed(cfg.seed)

    loader = make_loader(train_set, cfg.batch_size, cfg.workers)
    steps_per_epoch = max(1, math.ceil(train_set.num_samples() / cfg.batch_size))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and cfg.amp) else None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        train_set.set_epoch(epoch)
        sums: dict[str, float] = defaultdict(float)
        seen = correct = 0
        t0 = time.perf_counter()
        bar = tqdm(loader, total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for step, batch in enumerate(bar):
            e = epoch + min(step / steps_per_epoch, 1.0)
            lr = lr_at(cfg.optim, e, cfg.epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            x = batch_to_float(batch["image"].to(device, non_blocking=True))  # (B, C, H, W), channels_last
            y = batch["label"].to(device, non_blocking=True)  # (B,)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x).float()  # (B, C) live teacher (online mode)
            elif "logits" in batch:
                t = batch["logits"].to(device, non_blocking=True)  # (B, C) cached
            else:
                t = None
            with amp if amp is not None else _null():
                s = model(x)  # (B, C)
            parts = _compute_loss(loss_fn, s, t, y, batch.get("has_teacher"), e, cfg.optim.label_smoothing)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            b = len(y)
            seen += b
            correct += int((s.argmax(1) == y).sum())
            for k, v in parts.items():
                sums[k] += float(v.detach()) * b
        if seen == 0:
            raise RuntimeError(f"{desc}: epoch {epoch} saw no samples (empty split or budget?)")
        dt_epoch = time.perf_counter() - t0
        row: dict[str, float] = {"epoch": epoch + 1, "lr": lr_at(cfg.optim, epoch + 1, cfg.epochs)}
        row.update({f"train_{k}": v / seen for k, v in sums.items()})
        row["train_acc"] = correct / seen
        row["samples_per_s"] = seen / dt_epoch
        if test_set is not None and (epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            logits, labels = predict_split(model, test_set, cfg.batch_size * 2, device)
            row["test_acc"] = topk_accuracy(logits, labels, 1)
        history.append(row)
        log.info("%s epoch %d/%d: %s", desc, epoch + 1, cfg.epochs, {k: round(v, 4) for k, v in row.items()})
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "loss": _loss_state(loss_fn) if isinstance(loss_fn, nn.Module) else {},
        }
        _atomic_save(state, ckpt_path)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    return history


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _compute_loss(
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    s: torch.Tensor,
    t: torch.Tensor | None,
    y: torch.Tensor,
    has_teacher: torch.Tensor | None,
    epoch: float,
    label_smoothing: float,
) -> dict[str, torch.Tensor]:
    """The loss on rows with teacher logits; plain CE on rows without (budget `unqueried: ce`)."""
    s = s.float()
    if t is None:
        ce = nn.functional.cross_entropy(s, y, label_smoothing=label_smoothing)
        return {"loss": ce, "ce": ce}
    if has_teacher is None or bool(has_teacher.all()):
        return loss_fn(s, t, y, epoch=epoch)
    m = has_teacher.to(s.device)
    n_t = int(m.sum())
    ce_rest = nn.functional.cross_entropy(s[~m], y[~m], label_smoothing=label_smoothing)
    if n_t == 0:
        return {"loss": ce_rest, "ce_unqueried": ce_rest}
    parts = loss_fn(s[m], t[m], y[m], epoch=epoch)
    frac = n_t / len(y)
    parts = dict(parts)
    parts["loss"] = frac * parts["loss"] + (1 - frac) * ce_rest
    parts["ce_unqueried"] = ce_rest
    return parts
