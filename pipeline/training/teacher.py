"""Demo teachers: train one on the shards, or import a user's checkpoint, and record its accuracy.

`train_teacher` is what `stages.train_teacher` calls. A teacher entry of the `teachers` zoo either
names an architecture and a recipe (trained here with the same loop as the students, CE only, a
fresh augmentation per epoch and sample) or a `checkpoint` (a kdcache checkpoint or a bare
state_dict of `arch`), which is validated against the data set instead of trained.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TeacherSpec, TrainTeacherConfig
from pipeline.data.shards import Manifest
from pipeline.data.views import ViewRecipe
from pipeline.layout import Layout
from pipeline.losses.ce import CELoss
from pipeline.models.checkpoint import import_state_dict, load_model, save_model
from pipeline.models.registry import Normalized, build_for
from pipeline.records import write_record
from pipeline.runtime import pick_device, seed_everything, set_threads
from pipeline.training.dataset import DistillDataset
from pipeline.training.loop import train
from pipeline.training.validate import predict_split, topk_accuracy

log = logging.getLogger(__name__)


def import_teacher(path: str | Path, arch: str, manifest: Manifest) -> Normalized:
    """A user's teacher: a kdcache checkpoint of `arch`, or a bare state_dict of it, checked against the data set."""
    try:
        model, _ = load_model(path, expected_arch=arch, data=manifest)
    except (KeyError, ValueError, TypeError):  # not a kdcache checkpoint of `arch`: a bare state_dict (or an error)
        model = import_state_dict(path, arch, manifest)
    return model


def train_teacher(
    manifest: Manifest,
    name: str,
    spec: TeacherSpec,
    cfg: TrainTeacherConfig,
    out_dir: str | Path,
    *,
    metrics_dir: str | Path | None = None,
    resume: bool = False,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train (or import) teacher `name`; write `<out_dir>/<name>.pt` and its metrics record; return the metrics.

    `out_dir` is `Layout.teachers` in the pipeline; a demo teacher's epoch checkpoints go to `<name>.run/`.
    The record (`pipeline.records`: summary `<metrics_dir>/<name>.json`, details `<metrics_dir>/details/<name>.json`;
    `metrics_dir` defaults to `out_dir`) uses the students' key names: `accuracy` is test top-1.
    """
    files = Layout.teacher_files(out_dir, name, metrics_dir)
    device = device or pick_device()
    set_threads(cfg.train.threads)
    test_set = DistillDataset(manifest, "test", shuffle=False)
    history: list[dict[str, float]] = []
    if spec.checkpoint:
        model = import_teacher(spec.checkpoint, spec.arch, manifest)
        source = str(spec.checkpoint)
    else:
        tcfg = spec.train_config(cfg.train)
        seed_everything(tcfg.seed)
        model = build_for(spec.arch, manifest)
        train_set = DistillDataset(
            manifest,
            "train",
            seed=tcfg.seed,
            shuffle_buffer=tcfg.shuffle_buffer,
            recipe=ViewRecipe.fresh(seed=tcfg.seed),
            augment=True,
        )
        history = train(
            model,
            CELoss(),
            train_set,
            tcfg,
            files.run,
            test_set=test_set,
            device=device,
            resume=resume,
            desc=f"teacher {name}",
        )
        source = "trained by train_teacher"
    logits, labels = predict_split(model.to(device), test_set, 1000, device)
    metrics = {
        "teacher": name,
        "arch": spec.arch,
        "source": source,
        "accuracy": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
    }
    save_model(files.checkpoint, model.cpu(), spec.arch, extra={"name": name, "accuracy": metrics["accuracy"]})
    write_record({**metrics, "history": history}, files.metrics, files.details, "teacher")
    log.info("teacher %s (%s): test top-1 %.4f -> %s", name, spec.arch, metrics["accuracy"], files.checkpoint)
    return metrics
