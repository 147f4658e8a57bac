"""A tiny fake run for report and figure tests: records written exactly as the evaluate and train_teacher stages
write them (`split_metrics` -> `student_record` -> `write_record`), per-image predictions, curves, a manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.data.shards import Manifest, SplitManifest
from pipeline.evaluation.metrics import split_metrics, write_confusion_csv
from pipeline.evaluation.student import student_record
from pipeline.layout import Layout
from pipeline.records import write_record

CLASSES = 10
N_TEST = 400
CORRUPTIONS = ["gaussian_noise", "contrast", "jpeg"]
#: name -> (teacher skill, arch, params recorded in the record or None)
TEACHERS = {"small": (0.80, "cnn_tiny", None), "big": (0.92, "resnet8", 78_000)}
LOSSES = ["ce", "kd", "dist"]
SKILL = {"ce": 0.0, "kd": 0.6, "dist": 1.6}  # how much of the teacher's knowledge a loss passes on
FULL_CALLS = 2000


def fake_manifest(name: str = "fake", n_test: int = N_TEST, sha: str | None = None) -> Manifest:
    return Manifest(
        dataset=name,
        classes=tuple(f"c{k}" for k in range(CLASSES)),
        image_shape=(16, 16, 1),
        shard_size=100,
        mean=(0.5,),
        std=(0.25,),
        splits={
            "train": SplitManifest(1200, (), ()),
            "val": SplitManifest(200, (), ()),
            "test": SplitManifest(n_test, (), ()),
        },
        root=Path("."),
        sha256=sha or hashlib.sha256(name.encode()).hexdigest(),
    )


def _student_logits(rng, labels, teacher_logits, skill, t_acc, budget) -> np.ndarray:
    n, c = teacher_logits.shape
    onehot = np.eye(c)[labels]
    gain = skill * t_acc * (1.0 if budget == "full" else 0.5)
    return 2.2 * onehot + gain * teacher_logits / 4.0 + rng.normal(size=(n, c)) * 1.3


def make_run(
    root: Path,
    budgets: tuple[str, ...] = ("full", "250", "1000"),
    seeds: tuple[int, ...] = (0, 1, 2),
    manifest: Manifest | None = None,
    robustness: bool = True,
    warnings: dict[str, list[str]] | None = None,
    skill: dict[str, float] | None = None,
    teachers: dict[str, tuple[float, str, int | None]] | None = None,
) -> tuple[Layout, Manifest]:
    """metrics/ (students + teachers), plots/confusion, plots/curves of 2 teachers x 3 losses x budgets x seeds.

    skill: how much of the teacher each loss passes on (default `SKILL`; negative: worse than CE)."""
    manifest = manifest or fake_manifest()
    skill = {**SKILL, **(skill or {})}
    layout = Layout(manifest.dataset, root=root)
    rng = np.random.default_rng(0)
    n_classes = manifest.num_classes
    labels = rng.integers(0, n_classes, manifest.splits["test"].n)
    for t, (t_acc, arch, params) in (teachers or TEACHERS).items():
        hit = rng.random(len(labels)) < t_acc
        teacher_logits = rng.normal(size=(len(labels), n_classes)) + 5.0 * np.eye(n_classes)[labels] * hit[:, None]
        rec = {"teacher": t, "arch": arch, "source": "fake", "accuracy": float(hit.mean()), "top5": 0.99}
        rec["val_accuracy"] = float(hit.mean()) - 0.01
        if params:
            rec["params"] = params
        rec["warnings"] = (warnings or {}).get(t, [])
        rec["history"] = [{"epoch": 1, "val_acc": 0.5}]
        write_record(rec, layout.teacher_metrics(t), layout.teacher_details(t), "teacher")
        for loss in LOSSES:
            for budget in budgets:
                for seed in seeds:
                    srng = np.random.default_rng([seed, LOSSES.index(loss), len(budget)])
                    logits = _student_logits(srng, labels, teacher_logits, skill[loss], t_acc, budget)
                    clean = split_metrics(logits, labels, teacher_logits, topk=(1, 5))
                    sid = f"{t}-{loss}-{budget}-{seed}"
                    meta = {
                        "student_id": sid,
                        "teacher": t,
                        "loss": loss,
                        "budget": budget,
                        "seed": seed,
                        "teacher_calls": FULL_CALLS if budget == "full" else int(budget),
                        "arch": "cnn_tiny",
                        "val_accuracy": clean["accuracy"],  # as if validation scored like test here
                    }
                    robust = {}
                    if robustness:
                        acc = clean["accuracy"]
                        sev = {c: [acc * (1 - 0.08 * s) for s in range(1, 6)] for c in CORRUPTIONS}
                        robust = {
                            "mca": float(np.mean([np.mean(v) for v in sev.values()])),
                            "robustness": {
                                "per_corruption": {c: float(np.mean(v)) for c, v in sev.items()},
                                "severities": [1, 2, 3, 4, 5],
                                "per_severity": sev,
                                "clean": acc,
                            },
                        }
                    record = student_record(meta, manifest, clean, robust)
                    write_record(record, layout.student_metrics(sid), layout.student_details(sid), "student")
                    write_confusion_csv(layout.confusion(sid), labels, logits.argmax(1), manifest.classes)
                    curves = [{"epoch": e, "val_acc": clean["accuracy"] * (0.8 + 0.1 * e)} for e in (1, 2)]
                    layout.curves(sid).parent.mkdir(parents=True, exist_ok=True)
                    layout.curves(sid).write_text(json.dumps(curves))
    return layout, manifest
