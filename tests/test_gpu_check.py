"""`benchmarks/gpu_check.sh` runs in one command; on this CPU-only machine it skips the CUDA parts cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.slow  # runs every benchmark of the device check once (~75 s on 2 cores)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_gpu_check_quick_runs_on_cpu_prints_every_ratio_and_skips_the_cuda_parts():
    r = _run("--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "device: cpu (no CUDA device visible" in out
    assert "teach / bare throughput: median" in out  # 1. teach vs bare inference
    assert "(a) kd / ce" in out and "(b) offline speed-up" in out  # 2. student samples/s
    assert "where a batch's time goes" in out and "kd: loop beyond the in-memory step" in out  # the breakdown
    assert "skip: CMKD with torchsort's CUDA kernel needs a GPU" in out and "| cmkd |" in out  # 3.
    assert out.rstrip().endswith("gpu_check: done (cpu)")
    assert "Traceback" not in r.stderr and "RuntimeWarning" not in r.stderr


def test_gpu_check_help_and_a_bad_option():
    assert "One command for a machine with a GPU" in _run("--help").stdout
    bad = _run("--fast")
    assert bad.returncode == 2 and "unknown option '--fast'" in bad.stderr
