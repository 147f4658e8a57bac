"""Shared driver for experiment scripts: train + evaluate one student through the stage entry points.

Experiments (ablations, top-k vs dense, budgets) must train students exactly as `dvc repro` does, so
this module does not re-implement anything: it writes a params file with the requested overrides
into a work folder and calls `stages.distill.main` / `stages.evaluate.main` with outputs redirected
there. The project's `data/shards` and `data/logits` are read, never written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from stages import distill, evaluate


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
    """Train and evaluate one student; returns its metrics dict (also at workdir/metrics/<name>.json)."""
    params = yaml.safe_load(Path(params_path).read_text())
    params["distill"] = deep_update(params["distill"], distill_overrides or {})
    if loss_params is not None:
        params["distill"]["loss_params"][loss] = loss_params
    workdir.mkdir(parents=True, exist_ok=True)
    p = workdir / f"params-{name}.yaml"
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    out = workdir / "students" / name
    args = [
        "--teacher",
        teacher,
        "--loss",
        loss,
        "--seed",
        str(seed),
        "--budget",
        str(budget),
        "--params",
        str(p),
        "--out-dir",
        str(out),
        "--curves",
        str(workdir / "curves" / f"{name}.json"),
    ]
    if store:
        args += ["--store", store]
    distill.main(args)
    metrics = workdir / "metrics" / f"{name}.json"
    sid = distill.student_id(teacher, loss, budget, seed)
    evaluate.main(
        [
            "--student",
            sid,
            "--params",
            str(p),
            "--model",
            str(out / "model.pt"),
            "--out",
            str(metrics),
            "--confusion",
            str(workdir / "confusion" / f"{name}.csv"),
        ]
    )
    return json.loads(metrics.read_text())
