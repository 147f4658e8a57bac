"""A teacher's own checkpoint is a DVC dependency (issue 32): overwriting it reruns that teacher and what it feeds.

`teachers.<t>.checkpoint` must lie in `weights/`; the `teachers` stage depends on the folder and fingerprints each
teacher's files, and `train_teacher@<t>` depends on its fingerprint (`pipeline/inputs.py` says why). Checked with a
real `dvc status` in a temp project, and the fingerprints' rules directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ConfigError, TeacherSpec
from pipeline.inputs import in_weights, teacher_inputs, write_teacher_inputs
from stages import prepare, teachers, train_teacher
from tests.conftest import make_project, tiny_params
from tests.test_pipeline_e2e import TINY_TEACHER, _dvc, _stale

DEMO = TeacherSpec(arch="cnn_tiny", epochs=1)


def test_fingerprints_name_each_teachers_files_and_nothing_for_a_demo_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    Path("weights/a.pt").write_bytes(b"one")
    elsewhere = tmp_path / "models" / "b.pt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"two")
    Path("weights/b.pt").symlink_to(elsewhere)  # a link in the folder: tracked like a file (DVC follows it)
    zoo = {
        "demo": DEMO,
        "a": TeacherSpec(arch="cnn_tiny", checkpoint="weights/a.pt"),
        "b": TeacherSpec(arch="cnn_tiny", checkpoint=str(tmp_path / "weights" / "b.pt")),  # absolute, inside
    }
    paths = write_teacher_inputs(zoo, "out")
    got = {name: json.loads(p.read_text()) for name, p in paths.items()}
    assert got["demo"] == {"teacher": "demo", "files": []}
    assert got["a"]["files"] == [{"path": "weights/a.pt", "bytes": 3, "sha256": hashlib.sha256(b"one").hexdigest()}]
    assert got["b"]["files"][0]["sha256"] == hashlib.sha256(b"two").hexdigest()  # the linked file's content
    before = {n: p.read_bytes() for n, p in paths.items()}
    elsewhere.write_bytes(b"three")  # the linked file changes: only b's fingerprint does
    after = {n: p.read_bytes() for n, p in write_teacher_inputs(zoo, "out").items()}
    assert [n for n in before if before[n] != after[n]] == ["b"]


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ("models/b.pt", r"teachers.x.checkpoint: models/b.pt is outside weights/.*ln -s .*models/b.pt weights/b.pt"),
        ("weights/../models/b.pt", r"is outside weights/"),  # lexically outside, whatever it resolves to
        ("weights/missing.pt", r"teachers.x.checkpoint: weights/missing.pt is not a file"),
    ],
)
def test_a_checkpoint_dvc_could_not_track_is_refused(tmp_path, monkeypatch, checkpoint, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "models").mkdir()
    Path("models/b.pt").write_bytes(b"two")
    with pytest.raises(ConfigError, match=message):
        teacher_inputs("x", TeacherSpec(arch="cnn_tiny", checkpoint=checkpoint))
    assert in_weights("weights/sub/c.pt") and not in_weights("weightsx/c.pt") and not in_weights("weights")


def test_the_stage_fails_before_writing_when_one_checkpoint_is_misplaced(tmp_path, monkeypatch):
    zoo = {"small": TINY_TEACHER, "mine": {"arch": "cnn_tiny", "checkpoint": str(tmp_path / "elsewhere.pt")}}
    make_project(tmp_path / "p", tiny_params(teachers=zoo))
    (tmp_path / "elsewhere.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "p")
    with pytest.raises(ConfigError, match="teachers.mine.checkpoint: .*elsewhere.pt is outside weights/"):
        teachers.main([])
    assert not Path("data/teachers/inputs").exists()  # not even the demo teacher's fingerprint


def _perturbed_copy(src: Path, dst: Path) -> None:
    """A valid kdcache checkpoint with other bytes: `src`'s weights, one tensor nudged."""
    from pipeline.models import load_model, save_model

    model, meta = load_model(src)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim > 1).mul_(1.01)
    save_model(dst, model, meta["arch"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_overwriting_a_checkpoint_reruns_its_teacher_and_what_it_feeds(tmp_path):
    proj = make_project(tmp_path / "proj", tiny_params())
    cwd = os.getcwd()
    os.chdir(proj)
    try:  # a checkpoint worth importing (the teacher check refuses one near chance): the tiny demo teacher's
        prepare.main([])
        train_teacher.main(["--name", "small"])
        shutil.copy("data/teachers/small.safetensors", "weights/mine.safetensors")
    finally:
        os.chdir(cwd)
    for done in ("data", "metrics"):
        shutil.rmtree(proj / done)
    mine = {"arch": "cnn_tiny", "checkpoint": "weights/mine.safetensors"}
    params = tiny_params(teachers={"small": TINY_TEACHER, "mine": mine})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _dvc(proj, "init", "--no-scm", "-q").returncode == 0
    res = _dvc(proj, "repro", "-q", "teach@mine", "train_teacher@small")
    assert res.returncode == 0, res.stdout + res.stderr
    ran = {"teachers", "train_teacher@small", "train_teacher@mine", "teach@mine", "prepare"}
    assert not ran & _stale(proj)
    imported = _sha(proj / "data/teachers/mine.safetensors")

    # The user overwrites the checkpoint in place (same path, same params): `dvc status` sees it at once ...
    _perturbed_copy(proj / "weights/mine.safetensors", proj / "weights/mine.safetensors")
    status = json.loads(_dvc(proj, "status", "--json").stdout)
    assert status["teachers"] == [{"changed deps": {"weights": "modified"}}]
    assert not (ran - {"teachers"}) & set(status)  # what follows waits for the fingerprint
    # ... the fingerprints rerun (a hash of the named files), and only this teacher's changes
    assert _dvc(proj, "repro", "-q", "teachers").returncode == 0
    status = json.loads(_dvc(proj, "status", "--json").stdout)
    assert status["train_teacher@mine"] == [{"changed deps": {"data/teachers/inputs/mine.json": "modified"}}]
    assert not {"teachers", "train_teacher@small", "teach@mine", "prepare"} & set(status)
    # ... so `dvc repro` reimports it, and what it feeds follows (teach@mine reads the imported copy)
    res = _dvc(proj, "repro", "-q", "teach@mine")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _sha(proj / "data/teachers/mine.safetensors") != imported
    assert not ran & _stale(proj)
