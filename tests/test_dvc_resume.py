"""A `dvc repro` killed mid-training continues on the next `dvc repro` and ends byte-identical to an uninterrupted one.

DVC deletes a stage's outputs before it runs the stage, so the resume state lives outside them
(`checkpoints/<stage>/<item>/`, `Layout.resume_state`) and the stages continue a matching state by default.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import assert_same_files, make_project, tiny_params
from tests.test_pipeline_e2e import _dvc

SID = "small-kd-full-0"
TARGET = f"distill@{SID}"


def _params() -> dict:
    p = tiny_params()
    p["prepare"]["options"] = {**p["prepare"]["options"], "n": 512}
    p["teachers"] = {"small": {"arch": "cnn_tiny", "epochs": 6, "lr": 0.1, "batch_size": 32}}
    p["distill"]["losses"] = ["kd"]
    p["distill"]["train"]["epochs"] = 6
    return p


def _project(folder: Path) -> Path:
    proj = make_project(folder, _params())
    res = _dvc(proj, "init", "--no-scm", "-q")
    assert res.returncode == 0, res.stderr
    return proj


def _repro_until(proj: Path, state: Path) -> int:
    """Start `dvc repro`, SIGKILL it (and the stage it runs) once `state` holds a resume state; its epoch (0-based)."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = dict(os.environ, DVC_NO_ANALYTICS="1", KDCACHE_LOG="WARNING", PATH=path)
    cmd = [shutil.which("dvc", path=path), "repro", TARGET]
    # its own session: the kill takes dvc and the stage process it started, as a killed job or machine would
    proc = subprocess.Popen(
        cmd, cwd=proj, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (proj / state / "resume.json").is_file():
        assert proc.poll() is None, f"dvc repro ended (rc {proc.returncode}) before {state} appeared"
        assert time.monotonic() < deadline, f"no resume state in {state} after 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return json.loads((proj / state / "resume.json").read_text())["epoch"]


@pytest.mark.slow
def test_a_killed_dvc_repro_continues_teacher_and_student_to_identical_outputs(tmp_path):
    ref = _project(tmp_path / "ref")
    res = _dvc(ref, "repro", TARGET)
    assert res.returncode == 0, res.stdout + res.stderr

    run = _project(tmp_path / "run")
    epoch = _repro_until(run, Path("checkpoints/train_teacher/small"))
    assert epoch < 5, "the teacher finished before it could be killed: the test proves nothing"
    assert not (run / "data/teachers/small.safetensors").exists()
    epoch = _repro_until(run, Path(f"checkpoints/distill/{SID}"))  # the teacher finishes, then the student is killed
    assert epoch < 5, "the student finished before it could be killed: the test proves nothing"
    assert_same_files(run / "data/teachers/small.safetensors", ref / "data/teachers/small.safetensors")
    res = _dvc(run, "repro", TARGET)
    assert res.returncode == 0, res.stdout + res.stderr

    for out in (
        "data/teachers/small.safetensors",
        "metrics/teachers/small.json",
        "metrics/teachers/details/small.json",
        "data/logits/small.zarr",
        f"data/students/{SID}",
        f"plots/curves/{SID}.json",
    ):
        assert_same_files(run / out, ref / out)
    assert not (run / "checkpoints/distill" / SID).exists() and not (run / "checkpoints/train_teacher/small").exists()
    assert _dvc(run, "status", TARGET).stdout.strip().endswith("up to date.")
