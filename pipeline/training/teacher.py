"""Demo teachers: train one on the shards, or import a user's checkpoint, check it, and record its accuracy.

`train_teacher` is what `stages.train_teacher` calls. A teacher entry of the `teachers` zoo either
names an architecture and a recipe (trained here with the same loop as the students, CE only, a
fresh augmentation per epoch and sample, the best epoch on the validation split kept) or a
`checkpoint` (a kdcache checkpoint, or a safetensors / torch state_dict of `arch`, e.g. timm's own
`model.safetensors` for `timm:<name>`), which is validated against the data set instead of trained.

The teacher check (`teacher_check`) looks at the teacher's validation top-1 before anything is
distilled from it: an imported teacher near chance is an error (its class order or normalisation
does not match the data set: every student would learn noise), a trained one near chance or still
improving at the end of its schedule gets a warning, recorded in its metrics and shown at the top
of the report.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.cache.endpoint import EndpointNet, EndpointTeacher, client_for, write_endpoint_record
from pipeline.config import ConfigError, TeacherSpec, TrainTeacherConfig, naming
from pipeline.data.shards import Manifest
from pipeline.data.views import FRESH_VIEWS, build_recipe, check_recipe, view_manifest
from pipeline.errors import InputError
from pipeline.layout import Layout, TeacherFiles
from pipeline.lock import exclusive
from pipeline.losses.ce import CELoss
from pipeline.models.checkpoint import import_model, save_model
from pipeline.models.registry import Normalized, build_for, pretrained_source
from pipeline.models.sanity import near_chance
from pipeline.models.usercode import code_of
from pipeline.records import write_record
from pipeline.runtime import pick_device, seed_everything, set_threads, write_run_log
from pipeline.training import resume as resume_state
from pipeline.training.dataset import DistillDataset
from pipeline.training.loop import train
from pipeline.training.validate import held_out, predict_split, topk_accuracy

log = logging.getLogger(__name__)

#: a teacher whose validation top-1 gained more than this in its last evaluation interval is "still improving"
STILL_IMPROVING = 0.01


class TeacherCheckError(InputError):
    """An imported teacher that cannot be meant for this data set (near-chance accuracy): a user error (one line)."""


def still_improving(
    history: list[dict[str, float]], n_val: int | None = None
) -> tuple[tuple[int, float], tuple[int, float]] | None:
    """((epoch, best val top-1) by 9/10 of training, (epoch, best) at the end) when the last tenth of training
    raised the best validation top-1 by more than max(`STILL_IMPROVING`, 2 standard errors of an accuracy on
    `n_val` images); else None.

    Best-so-far rather than the last two points: consecutive evaluations differ by sampling noise alone (on
    400 validation images one image is 0.25 points), the best over a stretch of training does much less.
    With fewer than 10 epochs "9/10 of training" is the previous evaluation. The last tenth, not more: a cosine
    schedule's annealing raises validation accuracy over its last third or so even at convergence (the default
    5-epoch teachers on Fashion-MNIST: +3 to +5 points from epoch 3 to 5, +0.7 from epoch 4 to 5), which says
    nothing about whether more training would help.
    """
    vals = [(int(r["epoch"]), float(r["val_acc"])) for r in history if "val_acc" in r]
    if len(vals) < 2:
        return None
    total = max(int(r["epoch"]) for r in history)
    early = [v for v in vals if v[0] <= 0.9 * total] or vals[:-1]
    if early[-1][0] < 0.5 * total:  # nothing measured in the second half before the end
        return None
    before = max(early, key=lambda v: v[1])
    after = max(vals, key=lambda v: v[1])
    noise = 2.0 * (after[1] * (1 - after[1]) / n_val) ** 0.5 if n_val else 0.0
    if after[1] - before[1] > max(STILL_IMPROVING, noise):
        return before, after
    return None


def teacher_check(
    name: str,
    val_top1: float,
    manifest: Manifest,
    history: list[dict[str, float]],
    *,
    imported: bool,
    checkpoint_meta: dict[str, Any] | None = None,
    n_val: int | None = None,
) -> list[str]:
    """Warnings about a teacher, from its validation top-1 and training curve; raises for a mismatched import.

    - near chance (`near_chance`): an imported checkpoint raises `TeacherCheckError` naming the likely
      causes (class order, normalisation) with the data set's side of both; a trained one warns.
    - still improving (`still_improving`): the schedule ends while the teacher is still learning, so a
      longer one (`teachers.<name>.steps`, `train_teacher.train.min_steps`) gives a stronger teacher.
    """
    c = manifest.num_classes
    warnings: list[str] = []
    if near_chance(val_top1, c):
        msg = (
            f"teacher {name} reaches {val_top1:.1%} validation top-1 on {manifest.dataset}, near chance "
            f"({1 / c:.1%} for {c} classes)"
        )
        if imported:
            meta = checkpoint_meta or {}
            recorded = f"mean {meta.get('mean')}, std {meta.get('std')}" if meta.get("mean") else "none recorded"
            raise TeacherCheckError(
                f"{msg}: its outputs do not match this data set. Likely causes: (1) another class order: this data "
                f"set's classes are {list(manifest.classes)} in this order (label i = classes[i]); (2) another "
                f"input normalisation: this data set's mean {list(manifest.mean)}, std {list(manifest.std)}, "
                f"the teacher's {recorded}. Fix the checkpoint or `prepare` (class folders, source) and rerun"
            )
        warnings.append(f"{msg}: training failed; check teachers.{name}.lr and its schedule")
    gain = still_improving(history, n_val)
    if gain is not None and not imported:
        (e0, a0), (e1, a1) = gain
        warnings.append(
            f"teacher {name} is still improving at the end of its schedule: its best validation top-1 rose "
            f"{100 * (a1 - a0):.1f} points in the last tenth of training ({a0:.1%} by epoch {e0} -> {a1:.1%} by "
            f"epoch {e1}), more than sampling noise on {n_val or 'the'} validation images; a longer schedule "
            f"(teachers.{name}.steps or train_teacher.train.min_steps) gives a stronger teacher"
        )
    for w in warnings:
        log.warning(w)
    return warnings


def check_pretrained(name: str, spec: TeacherSpec, out_dir: str | Path) -> None:
    """`pretrained: true` names weights that kdcache never downloads: without `checkpoint:` say where to put them."""
    if spec.pretrained and not spec.checkpoint:
        where = Path("weights") / f"{name}.safetensors"
        raise ConfigError(
            f"teachers.{name}: pretrained: true, but kdcache never downloads weights and no checkpoint is set. "
            f"{pretrained_source(spec.arch)}. Put the file at {where} (any path outside {out_dir}/, which DVC owns) "
            f"and set teachers.{name}.checkpoint: {where}"
        )


def endpoint_teacher(spec: TeacherSpec, name: str, manifest: Manifest) -> tuple[EndpointTeacher, nn.Module]:
    """An endpoint teacher's client, checked against the server (classes, channels), and the same as a module for
    the evaluation passes (`EndpointNet`: the images go out as their uint8 pixels; the server normalises)."""
    c = manifest.image_shape[2]
    client = client_for(spec, name, manifest.num_classes)
    info = client.info()
    if int(info["in_channels"]) != c:
        got = info["in_channels"]
        raise ConfigError(f"endpoint: {spec.endpoint} serves a model of {got}-channel images; the data set has {c}")
    return client, Normalized(EndpointNet(client), (0.0,) * c, (1.0,) * c, mode="endpoint")  # x passes unchanged


def train_teacher(
    manifest: Manifest,
    name: str,
    spec: TeacherSpec,
    cfg: TrainTeacherConfig,
    out_dir: str | Path,
    *,
    metrics_dir: str | Path | None = None,
    resume: bool | Literal["auto"] = "auto",
    state_dir: str | Path | None = None,
    device: torch.device | None = None,
    run_log: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or import) teacher `name`; write `<out_dir>/<name>.safetensors` and its metrics record; return them.

    `out_dir` is `Layout.teachers` in the pipeline; a demo teacher's history goes to `<name>.run/`, its resume state
    to `state_dir` (`Layout.resume_state("train_teacher", name)` in the pipeline: outside DVC's outputs, so a killed
    `dvc repro` continues it; default `<name>.run/resume`), removed once the teacher is written. `resume`: as
    `run_student`'s. One writer per teacher (`pipeline.lock.exclusive` on its checkpoint).
    `run_log`: where the training's per-epoch timings go (the metrics file holds none, so it is reproducible).
    The record (`pipeline.records`: summary `<metrics_dir>/<name>.json`, details `<metrics_dir>/details/<name>.json`;
    `metrics_dir` defaults to `out_dir`) uses the students' key names: `accuracy` is test top-1.
    """
    check_pretrained(name, spec, out_dir)
    files = Layout.teacher_files(out_dir, name, metrics_dir)
    with exclusive(files.checkpoint, f"teacher {name} ({files.checkpoint})"):
        return _train_teacher(manifest, name, spec, cfg, files, resume, state_dir, device, run_log)


def _train_teacher(
    manifest: Manifest,
    name: str,
    spec: TeacherSpec,
    cfg: TrainTeacherConfig,
    files: TeacherFiles,
    resume: bool | Literal["auto"],
    state_dir: str | Path | None,
    device: torch.device | None,
    run_log: str | Path | None,
) -> dict[str, Any]:
    device = device or pick_device()
    set_threads(cfg.train.threads)
    # Fresh views of `train_teacher.augment` every (epoch, sample); its view 0 (the eval transform) for val/test.
    recipe = build_recipe(cfg.augment.spec(), views=FRESH_VIEWS, seed=cfg.train.seed)
    check_recipe(recipe, manifest, "train_teacher.augment")
    val_set = held_out(manifest, "val", recipe)
    summary: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    meta: dict[str, Any] = {}
    client = None
    if spec.endpoint:  # a live teacher: checked against the server, evaluated through it (its calls are counted)
        with naming(f"teachers.{name}"):
            client, model = endpoint_teacher(spec, name, manifest)
        source = spec.endpoint
    elif spec.checkpoint:
        # the view size the teacher will see (a recipe may crop images of any size to one): what a file checks against
        with naming(f"teachers.{name}"):
            model = import_model(spec.checkpoint, spec.arch, view_manifest(manifest, recipe), spec.preprocess)
        # what the teacher normalises its inputs with (recorded in a kdcache checkpoint, else the data set's)
        meta = {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
        source = str(spec.checkpoint)
    else:
        tcfg = spec.train_config(cfg.train)
        seed_everything(tcfg.seed)
        with naming(f"teachers.{name}.arch"):
            model = build_for(spec.arch, view_manifest(manifest, recipe), spec.preprocess)
        train_set = DistillDataset(
            manifest,
            "train",
            seed=tcfg.seed,
            shuffle_buffer=tcfg.shuffle_buffer,
            recipe=dataclasses.replace(recipe, seed=tcfg.seed),  # type: ignore[type-var]
            augment=True,
        )
        result = train(
            model,
            CELoss(),
            train_set,
            tcfg,
            files.run,
            val_set=val_set,
            device=device,
            resume=resume,
            state_dir=state_dir,
            fingerprint={
                "teacher": name,
                "preprocess": spec.preprocess,
                "recipe": f"fresh {recipe.describe()}, CE",
                **code_of(spec.arch),
            },
            desc=f"teacher {name}",
            run_log=run_log,
        )
        history, summary = result.history, result.summary()
        source = "trained by train_teacher"
    model = model.to(device)
    metrics: dict[str, Any] = {"teacher": name, "arch": spec.arch, "source": source}
    if val_set is not None:
        val_logits, val_labels = predict_split(model, val_set, 1000, device)
        metrics["val_accuracy"] = topk_accuracy(val_logits, val_labels, 1)
        metrics["warnings"] = teacher_check(
            name,
            metrics["val_accuracy"],
            manifest,
            history,
            imported=bool(spec.checkpoint or spec.endpoint),
            checkpoint_meta=meta,
            n_val=manifest.split("val").n,
        )
    logits, labels = predict_split(model, DistillDataset(manifest, "test", shuffle=False, recipe=recipe), 1000, device)
    metrics["accuracy"] = topk_accuracy(logits, labels, 1)  # test top-1: final reporting only, nothing chosen on it
    metrics["top5"] = topk_accuracy(logits, labels, 5)
    metrics.update({k: v for k, v in summary.items() if k != "val_accuracy"})  # schedule, selected epoch
    if client is not None:  # the record names the served model; the evaluation's calls go to the metrics
        write_endpoint_record(files.checkpoint, client.info(), manifest.image_shape[2])
        stats = client.stats.record(spec.cost_per_call)
        metrics["endpoint"] = {"fingerprint": client.fingerprint, "calls": stats["rows"], "cost": stats["cost"]}
        write_run_log(run_log, {"teacher": name, "endpoint": {"url": spec.endpoint, **stats}})
    else:
        save_model(files.checkpoint, model.cpu(), spec.arch, extra={"name": name, "accuracy": metrics["accuracy"]})
    write_record({**metrics, "history": history}, files.metrics, files.details, "teacher")
    resume_state.discard(state_dir if state_dir is not None else files.run / "resume")  # finished: nothing to resume
    log.info("teacher %s (%s): test top-1 %.4f -> %s", name, spec.arch, metrics["accuracy"], files.checkpoint)
    return metrics
