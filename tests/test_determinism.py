"""Identical inputs and params give byte-identical DVC outputs: every stage, run twice into two folders.

Wall-clock times and throughputs are what differs between two runs; they go to `logs/` (the run logs,
`Layout.run_log`), which no stage declares. The DVC view of the same property (a `dvc repro` of the
committed pipeline leaves `dvc.lock` unchanged) is in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.config import student_id
from pipeline.layout import Layout
from stages import corrupt, distill, evaluate, prepare, report, teach, train_teacher
from tests.conftest import file_digests, make_project, tiny_params

SID = student_id("small", "kd", "full", 0)


def outputs(layout: Layout) -> list[Path]:
    """Every DVC output of the tiny pipeline (dvc.yaml's outs, metrics and plots; `Layout` paths)."""
    return [
        layout.shards,
        layout.teacher_checkpoint("small"),
        layout.teacher_metrics("small"),
        layout.store("small"),
        layout.corrupt,
        layout.student(SID),
        layout.curves(SID),
        layout.student_metrics(SID),
        layout.confusion(SID),
        layout.reports,
    ]


def run_pipeline(folder: Path) -> dict[str, dict[str, str]]:
    """Every stage as `dvc repro` would run it (the dvc.yaml commands), in `folder`; returns the outputs' digests."""
    teacher = {"arch": "cnn_tiny", "epochs": 1, "lr": 0.1, "batch_size": 32}
    make_project(folder, tiny_params(teachers={"small": teacher}, distill={"losses": ["kd"]}))
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(folder)
    try:
        prepare.main([])
        train_teacher.main(["--name", "small"])
        teach.main(["--name", "small", "--reuse"])
        corrupt.main([])
        distill.main(["--teacher", "small", "--loss", "kd", "--budget", "full", "--seed", "0"])
        evaluate.main(["--student", SID])
        report.main([])
        layout = Layout("tiny")
        return {str(p): file_digests(p) for p in outputs(layout)}
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)  # the stages set their own thread counts


@pytest.mark.slow
def test_two_runs_give_byte_identical_dvc_outputs(tmp_path):
    first = run_pipeline(tmp_path / "a")
    second = run_pipeline(tmp_path / "b")
    assert first.keys() == second.keys()
    for out in first:
        assert first[out], f"{out} is empty"
        differ = sorted(f for f in first[out] if first[out][f] != second[out].get(f))
        assert first[out].keys() == second[out].keys() and not differ, f"{out}: {differ or 'different files'}"
    # What does vary lives beside the outputs: the run logs (never a DVC output).
    logs = tmp_path / "a" / "logs"
    assert (logs / "teach" / "small.json").exists() and (logs / "train_teacher" / "small.json").exists()
    timings = json.loads((logs / "distill" / f"{SID}.json").read_text())
    assert timings[0]["samples_per_s"] > 0
    store_attrs = json.loads((tmp_path / "a" / "data/logits/small.zarr/zarr.json").read_text())["attributes"]
    assert not {"created", "finished"} & set(store_attrs)
