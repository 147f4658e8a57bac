"""One student's test metrics: `evaluate_student` is what `stages.evaluate` calls.

Clean test-split metrics (accuracy, agreement and correlations with its teacher's cached test logits,
ECE with reliability data), accuracy on the corrupted test copies when the `corrupt` stage has run,
and the per-image predictions (`actual,predicted` CSV) for DVC's `confusion` template and the report's
paired tests. The record layout (summary numbers on top, the rest nested) is `pipeline.records`'.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.store import LogitStore, StoreError
from pipeline.config import ConfigError, EvaluateConfig
from pipeline.data.corruptions import load_corrupted
from pipeline.data.shards import Manifest
from pipeline.data.views import ViewRecipe
from pipeline.evaluation.metrics import robustness_metrics, split_metrics, write_confusion_csv
from pipeline.lock import reading
from pipeline.models.checkpoint import load_model
from pipeline.records import summary_of
from pipeline.runtime import pick_device
from pipeline.training.dataset import DistillDataset
from pipeline.training.validate import predict_split

log = logging.getLogger(__name__)

#: what a student's checkpoint metadata contributes to its record's `student` section (as `arch`: its `arch`)
META_KEYS = (
    "student_id",
    "teacher",
    "loss",
    "budget",
    "seed",
    "train_samples",
    "distinct_comparisons",
    "query",
    "schedule",
    "selected_epoch",
    "store",
)


def teacher_test_logits(store: Path, manifest: Manifest) -> np.ndarray | None:
    """The teacher's cached test logits (N, C) of view 0, or None without a store (teacher metrics skipped)."""
    if not store.exists():
        log.warning("no logit store %s: teacher-side metrics (agreement, correlations) skipped", store)
        return None
    test = LogitStore(store, "test", manifest)  # checked: damaged rows are an error naming the shard file
    queried = test.queried()[:, 0]  # (N,)
    if not queried.all():
        raise StoreError(
            f"{store}: the teacher answered only {int(queried.sum())} of {len(queried)} test images (view 0); "
            "agreement and correlations on a subset would not compare with other students'. Cache the whole "
            "test split (teach caches it unbudgeted; `kdcache import-logits` needs every test row)"
        )
    return test.read_all()[:, 0]


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
    number without a sign). Writes the confusion CSV (per-image predictions: DVC's confusion plot and the
    report's paired tests); returns the record (`student_record`), which `pipeline.records.write_record` writes.
    """
    model_path = Path(model_path)
    with reading(model_path.parent, f"student folder {model_path.parent}"):
        model, meta = load_model(model_path, data=manifest)
    store = Path(store or meta.get("store") or f"data/logits/{meta['teacher']}.zarr")
    with reading(store, f"logit store {store}"):  # a `teach --force` of it waits for this evaluation
        return _evaluate(manifest, model, meta, model_path, store, corrupt_dir, cfg, confusion, device)


def _evaluate(
    manifest: Manifest,
    model: torch.nn.Module,
    meta: dict[str, Any],
    model_path: Path,
    store: Path,
    corrupt_dir: str | Path,
    cfg: EvaluateConfig,
    confusion: str | Path,
    device: torch.device | None,
) -> dict[str, Any]:
    if store.exists() and meta.get("store_teacher") and LogitStore(store).teacher != meta["store_teacher"]:
        raise ConfigError(
            f"student {model_path} was trained on the logits of teacher {meta['store_teacher']}, but {store} holds "
            f"teacher {LogitStore(store).teacher}; pass --store with the store the student was trained on"
        )
    device = device or pick_device()
    model = model.to(device)
    # the test split through the eval transform the student's store was taught with (view 0)
    recipe = ViewRecipe.from_dict(LogitStore(store, split="test").view_recipe) if store.exists() else None
    test_set = DistillDataset(manifest, "test", shuffle=False, recipe=recipe)
    logits, labels = predict_split(model, test_set, cfg.batch_size, device)
    clean = split_metrics(logits, labels, teacher_test_logits(store, manifest), topk=cfg.topk)
    corrupt_dir = Path(corrupt_dir)
    robust: dict[str, Any] = {}
    if (corrupt_dir / "meta.json").exists():
        robust = robustness_metrics(model, load_corrupted(corrupt_dir, manifest), logits, cfg.batch_size, device)
    else:
        log.warning("no corrupted test set at %s (`dvc repro corrupt`): robustness metrics skipped", corrupt_dir)
    record = student_record(meta, manifest, clean, robust)
    write_confusion_csv(confusion, labels, logits.argmax(1), manifest.classes)
    log.info("%s: %s", meta.get("student_id", model_path), summary_of(record))
    return record


def student_record(
    meta: dict[str, Any], manifest: Manifest, clean: dict[str, Any], robust: dict[str, Any]
) -> dict[str, Any]:
    """One student's record (`pipeline.records` layout) from its checkpoint metadata and its metrics.

    Top level: the compared numbers (`accuracy`, `agreement`, `ece`, `mca`, `teacher_calls`, `val_accuracy`
    when the student was selected on a validation split); nested: `student` (identity, training facts),
    `data` (the data set it was evaluated on: the report refuses to mix data sets), `test`, `teacher`,
    `robustness` (see `split_metrics`, `robustness_metrics`).
    """
    record: dict[str, Any] = {k: clean[k] for k in ("accuracy", "agreement", "ece") if k in clean}
    if "mca" in robust:
        record["mca"] = robust["mca"]
    for k in ("teacher_calls", "val_accuracy"):
        if meta.get(k) is not None:
            record[k] = meta[k]
    record["student"] = {k: meta[k] for k in META_KEYS if meta.get(k) is not None} | {"arch": meta["arch"]}
    record["data"] = {
        "dataset": manifest.dataset,
        "manifest_sha256": manifest.sha256,
        "classes": manifest.num_classes,
    }
    record["test"] = clean["test"]
    if "teacher" in clean:
        record["teacher"] = clean["teacher"]
    if "robustness" in robust:
        record["robustness"] = robust["robustness"]
    return record
