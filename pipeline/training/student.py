"""One student run of the distill matrix: `run_student` is what `stages.distill` (and every experiment) calls.

A run is (teacher, loss, budget, seed): the student trains on the teacher's cached logits with that
loss, on all cached sample-views or on the first `budget` teacher calls of the store's selection
order, and its checkpoint, metadata and training curves are written where `Layout` says.

    student = StudentRun("resnet", "dist", budget=1000, seed=1)
    run_student(manifest, cfg, student, layout)   # -> data/students/resnet-dist-1000-1/model.safetensors + curves
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.budget import BudgetSpec
from pipeline.cache.store import LogitStore
from pipeline.config import ConfigError, DistillConfig, student_id
from pipeline.data.shards import Manifest
from pipeline.layout import STUDENT_MODEL, Layout
from pipeline.losses import build_loss
from pipeline.models.checkpoint import load_model, save_model
from pipeline.models.registry import build_for
from pipeline.runtime import pick_device, rank_world, seed_everything, set_threads
from pipeline.training.dataset import DistillDataset
from pipeline.training.loop import train
from pipeline.training.pool import QueriedPool
from pipeline.training.source import BatchSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentRun:
    """One item of the distill matrix."""

    teacher: str
    loss: str
    budget: str | int = "full"
    seed: int = 0

    @property
    def sid(self) -> str:
        return student_id(self.teacher, self.loss, self.budget, self.seed)

    @property
    def is_full(self) -> bool:
        return str(self.budget) == "full"


def budget_mask(store: LogitStore, labels: np.ndarray | None, budget: str | int) -> np.ndarray:
    """(N, V) sample-views a student may use: the first `budget` calls of the store's selection order."""
    queried = store.queried()
    if str(budget) == "full":
        return queried
    assert labels is not None
    mask = BudgetSpec.from_attrs(store.attrs.get("budget")).prefix(budget).mask(labels, store.views)
    if (mask & ~queried).any():
        raise ConfigError(
            f"budget {budget} needs teacher calls the store {store.path} never made (it holds {int(queried.sum())}); "
            "raise teach.budget or lower the distill budget"
        )
    return mask


def build_train_source(
    cfg: DistillConfig,
    manifest: Manifest,
    store_path: str | Path,
    allowed: np.ndarray,
    run: StudentRun,
    teacher_features: Any = None,
) -> BatchSource:
    """The student's training data: the in-memory queried pool for budget runs, else the shard stream.

    A budget run's few queried sample-views live in memory; every epoch draws the same number of
    samples as a full run would, so small budgets train for the same schedule. With
    `distill.unqueried: ce` a budget run streams every sample instead, with CE on the unqueried ones.
    """
    if not run.is_full and cfg.unqueried == "drop":
        return QueriedPool(
            manifest,
            "train",
            store_path,
            allowed,
            seed=run.seed,
            epoch_samples=cfg.pool_epoch_samples,
            teacher_features=teacher_features,
        )
    return DistillDataset(
        manifest,
        "train",
        store_path,
        seed=run.seed,
        shuffle_buffer=cfg.train.shuffle_buffer,
        allowed=allowed,
        unqueried=cfg.unqueried,
        teacher_features=teacher_features,
    )


def run_student(
    manifest: Manifest,
    cfg: DistillConfig,
    run: StudentRun,
    layout: Layout,
    *,
    store: str | Path | None = None,
    out_dir: str | Path | None = None,
    curves: str | Path | None = None,
    resume: bool = False,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train one student; rank 0 writes `model.safetensors` (with its metadata) and the curves. Returns the metadata.

    store / out_dir / curves override the layout's paths (experiments that train on another store).
    Under torchrun every rank calls this; the process group must already be initialised.
    """
    rank, _ = rank_world()
    if run.loss not in cfg.loss_params:
        raise ConfigError(
            f"no parameters for loss '{run.loss}': add distill.loss_params.{run.loss} to params.yaml "
            f"(configured: {sorted(cfg.loss_params)})"
        )
    if cfg.teacher_source not in ("cache", "online"):
        raise ConfigError(f"distill.teacher_source must be 'cache' or 'online', got '{cfg.teacher_source}'")
    loss_fn = build_loss(run.loss, **(cfg.loss_params[run.loss] or {}))
    store_path = Path(store or layout.store(run.teacher))
    train_store = LogitStore(store_path, "train", manifest)
    labels = None if run.is_full else manifest.iter_labels("train")
    allowed = budget_mask(train_store, labels, run.budget)
    tcfg = dataclasses.replace(cfg.train, seed=run.seed)
    set_threads(tcfg.threads)
    seed_everything(run.seed)
    # The loss's teacher side (CMKD's soft ranks...) depends on the cached logits alone: the loader's worker
    # computes it per batch, off the training step (identical results, tested).
    features = loss_fn.teacher_features if getattr(loss_fn, "uses_teacher_features", False) else None
    if cfg.teacher_source == "online":
        features = None
    train_set = build_train_source(cfg, manifest, store_path, allowed, run, teacher_features=features)
    test_set = DistillDataset(manifest, "test", shuffle=False, split_nodes=False)  # rank 0 evaluates it whole
    teacher = None
    if cfg.teacher_source == "online":
        teacher, _ = load_model(layout.teacher_checkpoint(run.teacher), data=manifest)
    model = build_for(cfg.student, manifest, cfg.student_preprocess)
    out = Path(out_dir or layout.student(run.sid))
    history = train(
        model,
        loss_fn,
        train_set,
        tcfg,
        out,
        test_set=test_set,
        device=device or pick_device(),
        resume=resume,
        teacher=teacher,
        desc=run.sid,
        arch=cfg.student,
    )
    meta = {
        "student_id": run.sid,
        "teacher": run.teacher,
        "loss": run.loss,
        "budget": str(run.budget),
        "seed": run.seed,
        "teacher_calls": int(allowed.sum()),
        "train_samples": train_set.pool_size() if isinstance(train_set, QueriedPool) else train_set.num_samples(),
        "distinct_comparisons": history[-1].get("distinct_comparisons"),
        "store_teacher": train_store.teacher,
        "store": str(store_path),  # what `evaluate` compares the student with by default
    }
    if rank != 0:
        return meta  # only rank 0 writes outputs
    save_model(out / STUDENT_MODEL, model.cpu(), cfg.student, extra=meta)
    curves_path = Path(curves or layout.curves(run.sid))
    curves_path.parent.mkdir(parents=True, exist_ok=True)
    curves_path.write_text(json.dumps(history, indent=1) + "\n")
    log.info("student %s done: test top-1 %.4f", run.sid, history[-1].get("test_acc", float("nan")))
    return meta
