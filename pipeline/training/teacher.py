"""Demo teachers: train one on the shards, or import a user's checkpoint, and record its accuracy.

`train_teacher` is what `stages.train_teacher` calls. A teacher entry of the `teachers` zoo either
names an architecture and a recipe (trained here with the same loop as the students, CE only, a
fresh augmentation per epoch and sample) or a `checkpoint` (a kdcache checkpoint, or a safetensors /
torch state_dict of `arch`, e.g. timm's own `model.safetensors` for `timm:<name>`), which is validated
against the data set instead of trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, TeacherSpec, TrainTeacherConfig
from pipeline.data.shards import Manifest
from pipeline.data.views import ViewRecipe
from pipeline.layout import Layout
from pipeline.losses.ce import CELoss
from pipeline.models.checkpoint import import_model, save_model
from pipeline.models.registry import build_for, pretrained_source
from pipeline.runtime import pick_device, seed_everything, set_threads
from pipeline.training.dataset import DistillDataset
from pipeline.training.loop import train
from pipeline.training.validate import predict_split, topk_accuracy

log = logging.getLogger(__name__)


def check_pretrained(name: str, spec: TeacherSpec, out_dir: str | Path) -> None:
    """`pretrained: true` names weights that kdcache never downloads: without `checkpoint:` say where to put them."""
    if spec.pretrained and not spec.checkpoint:
        where = Path("weights") / f"{name}.safetensors"
        raise ConfigError(
            f"teachers.{name}: pretrained: true, but kdcache never downloads weights and no checkpoint is set. "
            f"{pretrained_source(spec.arch)}. Put the file at {where} (any path outside {out_dir}/, which DVC owns) "
            f"and set teachers.{name}.checkpoint: {where}"
        )


def train_teacher(
    manifest: Manifest,
    name: str,
    spec: TeacherSpec,
    cfg: TrainTeacherConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train (or import) teacher `name`; write `<out_dir>/<name>.safetensors` and `<name>.json`; return the metrics.

    `out_dir` is `Layout.teachers` in the pipeline; a demo teacher's epoch checkpoints go to `<name>.run/`.
    """
    check_pretrained(name, spec, out_dir)
    files = Layout.teacher_files(out_dir, name)
    device = device or pick_device()
    set_threads(cfg.train.threads)
    test_set = DistillDataset(manifest, "test", shuffle=False)
    history: list[dict[str, float]] = []
    if spec.checkpoint:
        model = import_model(spec.checkpoint, spec.arch, manifest, spec.preprocess)
        source = str(spec.checkpoint)
    else:
        tcfg = spec.train_config(cfg.train)
        seed_everything(tcfg.seed)
        model = build_for(spec.arch, manifest, spec.preprocess)
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
        "test_top1": topk_accuracy(logits, labels, 1),
        "test_top5": topk_accuracy(logits, labels, 5),
    }
    save_model(files.checkpoint, model.cpu(), spec.arch, extra={"name": name, "test_top1": metrics["test_top1"]})
    files.metrics.write_text(json.dumps({**metrics, "history": history}, indent=1) + "\n")
    log.info("teacher %s (%s): test top-1 %.4f -> %s", name, spec.arch, metrics["test_top1"], files.checkpoint)
    return metrics
