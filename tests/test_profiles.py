"""Profiles are complete, valid params files: every section parses, every architecture and loss exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    DistillConfig,
    PrepareConfig,
    TeachConfig,
    TrainTeacherConfig,
    ensembles_section,
    from_dict,
    teachers_section,
)
from pipeline.data.sources import SOURCES
from pipeline.losses import build_loss
from pipeline.models import canonical_arch

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_profile_is_valid(path):
    p = yaml.safe_load(path.read_text())
    assert set(p) == set(yaml.safe_load((ROOT / "params.yaml").read_text()))  # same sections as params.yaml
    prep = from_dict(PrepareConfig, p["prepare"], "prepare")
    assert prep.source in SOURCES
    from_dict(TrainTeacherConfig, p["train_teacher"], "train_teacher")
    from_dict(TeachConfig, p["teach"], "teach")
    d = from_dict(DistillConfig, p["distill"], "distill")
    zoo = teachers_section(p)
    for spec in zoo.values():
        canonical_arch(spec.arch)
    canonical_arch(d.student)
    assert set(d.teachers) <= set(zoo) | set(ensembles_section(p))  # ensembles are checked against the zoo
    for loss in d.losses:
        build_loss(loss, **(d.loss_params[loss] or {}))
    # every param dvc.yaml tracks exists (DVC refuses to run a stage whose param is missing from params.yaml)
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for key in stage.get("do", stage).get("params", []):
            if "${" not in key:
                node = p
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"{path.name}: no {key} (dvc.yaml tracks it)"
                    node = node[part]


def test_cifar100_profile_is_the_papers_recipe():
    p = yaml.safe_load((ROOT / "profiles/cifar100.yaml").read_text())
    o = p["distill"]["train"]["optim"]
    assert p["distill"]["train"]["epochs"] == 240 and p["distill"]["train"]["batch_size"] == 64
    assert (o["lr"], o["momentum"], o["weight_decay"], o["milestones"], o["gamma"]) == (
        0.05,
        0.9,
        5.0e-4,
        [150, 180, 210],
        0.1,
    )
    assert p["teach"]["augment"] == {"pad": 4, "flip": True}


def test_cifar10_benchmark_skips_cleanly_without_the_archive(tmp_path, capsys):
    from benchmarks import cifar10_profile

    assert cifar10_profile.main(["--archive", str(tmp_path / "absent.tar.gz"), "--workdir", str(tmp_path / "w")]) == 0
    assert "skip:" in capsys.readouterr().out and not (tmp_path / "w").exists()


def test_every_value_that_shapes_results_is_spelled_out_in_params_yaml():
    """A default hidden in config.py would change results without DVC noticing (config.py is no stage's dep):
    every field of the training and teach sections is written out in params.yaml. Exempt: the one of
    `epochs`/`steps` not used, `distill.train.seed` (each student's seed is its matrix item's),
    `optim.milestones` (read by `schedule: step` only, which needs them set), and the teacher's
    epochs/lr/batch size (each teacher's own, in `teachers.<name>`)."""
    import dataclasses

    from pipeline.config import DistillConfig, OptimConfig, PrepareConfig, TeachConfig, TrainConfig

    p = yaml.safe_load((ROOT / "params.yaml").read_text())

    # How loader workers start changes no result (same weights either way: tests/test_device_path.py)
    NO_EFFECT = {"worker_start"}

    def missing(cls, d, where, exempt=()):
        return [f"{where}.{f.name}" for f in dataclasses.fields(cls) if f.name not in d and f.name not in exempt]

    gaps = missing(PrepareConfig, p["prepare"], "prepare") + missing(TeachConfig, p["teach"], "teach")
    gaps += missing(DistillConfig, p["distill"], "distill")
    for where, train, exempt in (
        ("distill.train", p["distill"]["train"], {"steps", "seed", *NO_EFFECT}),
        ("train_teacher.train", p["train_teacher"]["train"], {"steps", "epochs", "batch_size", *NO_EFFECT}),
    ):
        gaps += missing(TrainConfig, train, where, exempt)
        # milestones: only read by `schedule: step`, which cannot be used without setting them
        # label_smoothing in distill: refused unless 0 (a student's loss owns its CE's smoothing: loss_params)
        optim_exempt = {"milestones", "lr"} if where.startswith("train_") else {"milestones", "label_smoothing"}
        gaps += missing(OptimConfig, train["optim"], f"{where}.optim", optim_exempt)
    assert not gaps, gaps
