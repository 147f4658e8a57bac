"""The CPU kernel pin (`runtime.reproducible`, pipeline/kernels.py): set before torch loads, equal to a CPU limited
from outside, and refused with a one-line warning where the CPU cannot run it."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import kernels
from tests.conftest import ROOT, make_project, tiny_params

#: sha256 of the tiny teacher below, trained with the pinned kernels (torch 2.14.1, numpy 2.x) on an AMD EPYC
#: (AVX2, no AVX-512). The same bytes on every x86-64 machine with AVX2 is the pin's promise: an Intel machine
#: with AVX-512 that gives other bytes shows a kernel path the pin does not cover yet.
GOLDEN_TEACHER = {"2.14.1": "327c07c5069bf3bf4eeb2978b62432ea0110ce8cb2e7c8aeae557acb724c6b59"}

PROBE = "import os, stages, torch; print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'))"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without any pin variable (a fresh shell), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in kernels.PIN}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _params(folder: Path, reproducible: bool) -> None:
    p = yaml.safe_load((folder / "params.yaml").read_text()) if (folder / "params.yaml").exists() else tiny_params()
    p["runtime"] = {"reproducible": reproducible}
    (folder / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def test_this_test_process_computes_with_the_pinned_kernels():
    """conftest pins before torch loads: the suite's numbers are the stages' numbers."""
    if kernels.pin_unsupported() is not None:
        pytest.skip(f"no pin here: {kernels.pin_unsupported()}")
    assert all(os.environ.get(k) == v for k, v in kernels.PIN.items())
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert kernels.describe().startswith("CPU kernels pinned")


@pytest.mark.parametrize("reproducible", [True, False])
def test_a_stage_process_pins_before_torch_loads_as_params_say(tmp_path, reproducible):
    if kernels.pin_unsupported() is not None:
        pytest.skip(f"no pin here: {kernels.pin_unsupported()}")
    _params(tmp_path, reproducible)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    capability, cbwr = out.stdout.split()
    if reproducible:
        assert (capability, cbwr) == ("AVX2", "AVX2,STRICT")
    else:
        assert cbwr == "None"  # native: nothing set (the capability is whatever this CPU has)


def test_the_params_file_on_the_command_line_decides(tmp_path):
    _params(tmp_path, False)
    assert kernels.wanted(["--params", str(tmp_path / "params.yaml")]) is False
    assert kernels.wanted([f"--params={tmp_path / 'params.yaml'}"]) is False
    assert kernels.wanted(["--params", str(tmp_path / "missing.yaml")]) is True  # the stage reports the file
    (tmp_path / "bad.yaml").write_text("runtime: {reproducible: maybe}\n")
    assert kernels.wanted(["--params", str(tmp_path / "bad.yaml")]) is True


@pytest.mark.parametrize(
    ("machine", "flags", "why"),
    [
        ("aarch64", None, "this CPU is aarch64, not x86-64"),
        ("x86_64", {"sse4_2", "avx"}, "this x86-64 CPU lacks AVX2/FMA"),
        ("x86_64", {"avx2"}, "this x86-64 CPU lacks FMA"),
        ("x86_64", {"avx2", "fma", "avx512f"}, None),
    ],
)
def test_which_cpus_can_run_the_pin(machine, flags, why):
    assert kernels.pin_unsupported(machine, flags) == why


def test_a_cpu_without_avx2_runs_natively_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "pin_unsupported", lambda: "this CPU is aarch64, not x86-64")
    env: dict[str, str] = {}
    with caplog.at_level(logging.WARNING, logger="pipeline.kernels"):
        assert kernels.pin_cpu_kernels(True, env) is False
    assert env == {}
    (record,) = caplog.records
    assert "\n" not in record.getMessage()
    assert "aarch64" in record.getMessage() and "reproducible run to run on this machine" in record.getMessage()


def test_too_late_to_pin_is_said(monkeypatch, caplog):
    """torch is loaded here: a process whose environment lacks the pin cannot pin any more, and says how to."""
    if kernels.pin_unsupported() is not None:
        pytest.skip(f"no pin here: {kernels.pin_unsupported()}")
    env = {k: v for k, v in kernels.PIN.items() if k != "MKL_CBWR"}
    with caplog.at_level(logging.WARNING, logger="pipeline.kernels"):
        assert kernels.pin_cpu_kernels(True, env) is False
    assert "loaded before the CPU kernels could be pinned" in caplog.text and "MKL_CBWR" in caplog.text
    assert kernels.pin_cpu_kernels(True, dict(kernels.PIN)) is True  # already in force: nothing to say
    assert kernels.pin_cpu_kernels(False, {}) is False


def _train_teacher(folder: Path, env: dict[str, str]) -> str:
    """prepare + train_teacher@small as `dvc repro` runs them (one process each); the checkpoint's sha256."""
    for cmd in (["stages.prepare"], ["stages.train_teacher", "--name", "small"]):
        out = subprocess.run(
            [sys.executable, "-m", *cmd], cwd=folder, env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
    return hashlib.sha256((folder / "data/teachers/small.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_pinned_teacher_equals_one_trained_on_a_cpu_limited_from_outside(tmp_path):
    """The issue's proof: the same tiny teacher trained (a) by stages that pin themselves and (b) natively by stages
    on a CPU limited from outside to the pinned ISA (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ...`):
    byte-identical checkpoints. (c) Against a golden hash: the same bytes another x86-64 machine must give."""
    if kernels.pin_unsupported() is not None:
        pytest.skip(f"no pin here: {kernels.pin_unsupported()}")
    params = tiny_params(teachers={"small": {"arch": "cnn_tiny", "epochs": 2, "lr": 0.1, "batch_size": 32}})
    pinned, outside = make_project(tmp_path / "pinned", params), make_project(tmp_path / "outside", params)
    _params(pinned, True)
    _params(outside, False)
    a = _train_teacher(pinned, _clean_env())
    b = _train_teacher(outside, _clean_env(**kernels.PIN))
    assert a == b
    golden = GOLDEN_TEACHER.get(torch.__version__.split("+")[0])
    if golden is None:
        pytest.skip(f"no golden checkpoint hash recorded for torch {torch.__version__} (pinned run gave {a})")
    assert a == golden, "the pinned kernels gave other bytes than on the machine that recorded GOLDEN_TEACHER"
