"""One student's test metrics: `evaluate_student` is what `stages.evaluate` calls.

Clean test-split metrics (accuracy, agreement and correlations with its teacher's cached test logits,
ECE with reliability data), accuracy on the corrupted test copies when the `corrupt` stage has run,
and the confusion-matrix CSV for DVC's `confusion` template.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.store import LogitStore
from pipeline.config import ConfigError, EvaluateConfig
from pipeline.data.corruptions import load_corrupted
from pipeline.data.shards import Manifest
from pipeline.evaluation.metrics import robustness_metrics, split_metrics, write_confusion_csv
from pipeline.models.checkpoint import load_model
from pipeline.runtime import pick_device
from pipeline.training.dataset import DistillDataset
from pipeline.training.validate import predict_split

log = logging.getLogger(__name__)

#: what a student's checkpoint metadata contributes to its metrics file
META_KEYS = (
    "student_id",
    "teacher",
    "loss",
    "budget",
    "seed",
    "teacher_calls",
    "train_samples",
    "distinct_comparisons",
    "schedule",
    "selected_epoch",
    "val_top1",
)


def teacher_test_logits(store: Path, manifest: Manifest) -> np.ndarray | None:
    """The teacher's cached test logits (N, C) of view 0, or None without a store (teacher metrics skipped)."""
    if not store.exists():
        log.warning("no logit store %s: teacher-side metrics (agreement, correlations) skipped", store)
        return None
    return LogitStore(store, "test", manifest).read_all()[:, 0]


def evaluate_student(
    manifest: Manifest,
    model_path: str | Path,
    corrupt_dir: str | Path,
    cfg: EvaluateConfig,
    confusion: str | Path,
    *,
    store: str | Path | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The metrics of the student checkpoint at `model_path` against the teacher store it was trained on.

    Agreement and correlations are computed against the test logits of `store`, by default the store the
    student recorded at training time; a store of another teacher is an error (it would give a wrong
    number without a sign). Writes the confusion CSV; returns the metrics dict.
    """
    model, meta = load_model(model_path, data=manifest)
    store = Path(store or meta.get("store") or f"data/logits/{meta['teacher']}.zarr")
    if store.exists() and meta.get("store_teacher") and LogitStore(store).teacher != meta["store_teacher"]:
        raise ConfigError(
            f"student {model_path} was trained on the logits of teacher {meta['store_teacher']}, but {store} holds "
            f"teacher {LogitStore(store).teacher}; pass --store with the store the student was trained on"
        )
    device = device or pick_device()
    model = model.to(device)
    logits, labels = predict_split(model, DistillDataset(manifest, "test", shuffle=False), cfg.batch_size, device)
    metrics: dict[str, Any] = {k: meta[k] for k in META_KEYS if meta.get(k) is not None}
    metrics["student_arch"] = meta["arch"]
    metrics.update(split_metrics(logits, labels, teacher_test_logits(store, manifest), topk=cfg.topk))
    corrupt_dir = Path(corrupt_dir)
    if (corrupt_dir / "meta.json").exists():
        metrics.update(robustness_metrics(model, load_corrupted(corrupt_dir, manifest), logits, cfg.batch_size, device))
    else:
        log.warning("no corrupted test set at %s (`dvc repro corrupt`): robustness metrics skipped", corrupt_dir)
    write_confusion_csv(confusion, labels, logits.argmax(1), manifest.classes)
    log.info(
        "%s: %s",
        meta.get("student_id", model_path),
        {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
    )
    return metrics
