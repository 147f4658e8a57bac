"""Shared driver for experiment scripts: train + evaluate one student exactly as `dvc repro` does.

Experiments (ablations, top-k vs dense, budgets) call the same library functions as the `distill` and
`evaluate` stages (`pipeline.training.student.run_student`, `pipeline.evaluation.student.evaluate_student`)
with the project's params plus the requested overrides, and outputs redirected into a work folder. The
project's `data/shards` and `data/logits` are read, never written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.config import DistillConfig, EvaluateConfig, PrepareConfig, from_dict, load_params, section
from pipeline.data.shards import load_manifest
from pipeline.evaluation.report import fmt_ci, fmt_iv
from pipeline.evaluation.stats import mean_ci
from pipeline.evaluation.student import evaluate_student
from pipeline.layout import STUDENT_MODEL, Layout
from pipeline.records import write_record
from pipeline.training.student import StudentRun
from pipeline.training.student import run_student as train_student


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_student(
    workdir: Path,
    name: str,
    *,
    teacher: str,
    loss: str,
    loss_params: dict[str, Any] | None = None,
    seed: int = 0,
    budget: str | int = "full",
    store: str | None = None,
    distill_overrides: dict[str, Any] | None = None,
    params_path: str = "params.yaml",
) -> dict[str, Any]:
    """Train and evaluate one student; returns its record (`pipeline.records` layout: `accuracy` is test top-1),
    written as workdir/metrics/<name>.json (summary) and workdir/metrics/details/<name>.json."""
    params = load_params(params_path)
    distill = deep_update(params["distill"], distill_overrides or {})
    if loss_params is not None:
        distill["loss_params"][loss] = loss_params
    cfg = from_dict(DistillConfig, distill, "distill")
    layout = Layout(from_dict(PrepareConfig, section(params, "prepare"), "prepare").name)
    manifest = load_manifest(layout.shards)
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "students" / name
    train_student(
        manifest,
        cfg,
        StudentRun(teacher, loss, budget, seed),
        layout,
        store=store,
        out_dir=out,
        curves=workdir / "curves" / f"{name}.json",
    )
    metrics = evaluate_student(
        manifest,
        out / STUDENT_MODEL,
        layout.corrupt,
        from_dict(EvaluateConfig, section(params, "evaluate"), "evaluate"),
        workdir / "confusion" / f"{name}.csv",
        store=store,
    )
    path = metrics_path(workdir, name)
    write_record(metrics, path, Layout.details(path), "student")
    return metrics


def metrics_path(workdir: Path, name: str) -> Path:
    """Where `run_student` writes a student's summary record."""
    return workdir / "metrics" / f"{name}.json"


def find_student(workdir: Path, name: str) -> dict[str, Any] | None:
    """The summary record of a student `run_student` already trained (accuracy, val_accuracy, agreement, ...), or
    None: what makes every benchmark driver resumable."""
    path = metrics_path(workdir, name)
    return json.loads(path.read_text()) if path.exists() else None


def summarize(values: list[float]) -> str:
    """`mean ± std [95% t-interval]` in % over seeds (the report's formatting), or the one value."""
    iv = mean_ci(values)
    return fmt_iv(iv) + (f" {fmt_ci(iv)}" if iv.lo is not None else "")
