"""Byte-identical numbers on any x86-64 machine: the CPU kernels pinned to one instruction set (AVX2).

PyTorch's and NumPy's CPU kernels pick their code path by the machine's instruction set (ISA): ATen's
vectorised ops (softmax, reductions: 8 floats per AVX2 register, 16 per AVX-512 one, so sums associate
differently), oneDNN's convolutions, MKL's GEMM (`nn.Linear`; MKL also takes other paths on AMD than on Intel)
and NumPy's SIMD loops and OpenBLAS. Every path is correct, but their float rounding differs: one teacher
trained on an AVX-512 machine ends with other weights than on an AVX2 one, and every number downstream moves.

`runtime.reproducible: true` (the default) therefore pins every one of those dispatchers to AVX2, which every
x86-64 CPU of the last decade has, through the variables each library reads when it loads:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (read at the first dispatch);
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (convolutions, pooling, channels_last ops);
- ``MKL_CBWR=AVX2,STRICT``: MKL's conditional numerical reproducibility, AVX2 branch, strict mode (GEMM results
  the same on Intel and AMD, whatever the alignment);
- ``NPY_DISABLE_CPU_FEATURES``: NumPy's AVX-512 dispatch targets (the names of NumPy 1.x and 2.x alike);
- ``OPENBLAS_CORETYPE=Haswell``: NumPy's OpenBLAS kernels (the AVX2 ones).

They must be set before torch and numpy load, so the pin is applied by the entry points (`stages/__init__.py`
for `python -m stages.<name>`, `pipeline.cli.main`, the benchmarks, the test suite's conftest), never by a library
import. Child processes (DataLoader workers, dask workers, torchrun ranks) inherit the environment. Threads are
pinned by params (`*.threads`) like everything else.

What it buys: the same outputs on every x86-64 machine with AVX2 and FMA for the same torch/numpy builds and
thread counts (tests/test_kernels.py trains a teacher both ways and compares checkpoint bytes, and against a
golden hash). What it does not: a CPU without AVX2 (an old x86) or another architecture (ARM) cannot run these
kernels, so the run goes on natively with a one-line warning (reproducible run to run on that machine only), and
GPUs are not bit-exact across cards or drivers at all. `runtime.reproducible: false` runs natively everywhere
(faster on an AVX-512 machine: BENCHMARKS.md, "CPU kernel pin").
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: NumPy's dispatch targets above AVX2: the 2.x names (X86_V4 ...) and the 1.x names (AVX512F ...); a name a NumPy
#: version does not know is ignored by it.
_NUMPY_ABOVE_AVX2 = (
    "X86_V4 AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
)

#: The environment that pins every CPU kernel dispatcher the pipeline's numbers go through to AVX2.
PIN: Mapping[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
    "NPY_DISABLE_CPU_FEATURES": _NUMPY_ABOVE_AVX2,
    "OPENBLAS_CORETYPE": "Haswell",
}

#: What the CPU needs for the pinned kernels (ATen's avx2 capability requires both).
NEEDED_FLAGS = ("avx2", "fma")

#: The libraries that read `PIN` once, when they load.
_READERS = ("torch", "numpy")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (lower case), None where they cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return None


def pin_unsupported(machine: str | None = None, flags: set[str] | None = None) -> str | None:
    """Why this CPU cannot run the pinned kernels (one phrase), or None when it can."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return f"this CPU is {machine}, not x86-64"
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None  # not Linux: ATen itself checks the capability; trust the x86-64 machine
    missing = [f for f in NEEDED_FLAGS if f not in flags]
    return f"this x86-64 CPU lacks {'/'.join(f.upper() for f in missing)}" if missing else None


def _params_path(argv: Sequence[str]) -> Path:
    """The `--params` file named on a stage's command line (default params.yaml)."""
    for i, arg in enumerate(argv):
        if arg == "--params" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return Path("params.yaml")


def wanted(argv: Sequence[str] | None = None) -> bool:
    """`runtime.reproducible` of the params file the command line names (True when it cannot be read: the stage
    itself reports a bad params file, and the pin is the safe default)."""
    from pipeline.config import RuntimeConfig, from_dict, load_params  # yaml only: no torch, no numpy

    try:
        params = load_params(_params_path(sys.argv[1:] if argv is None else argv))
        return from_dict(RuntimeConfig, params.get("runtime") or {}, "runtime").reproducible
    except Exception:  # noqa: BLE001 (any problem is the stage's to report, with its own message)
        return True


def pin_cpu_kernels(enabled: bool = True, environ: dict[str, str] | None = None) -> bool:
    """Set `PIN` in the environment (before torch/numpy load); returns whether the kernels are pinned.

    On a CPU without AVX2 + FMA (or not x86-64) it warns once and leaves the kernels native. Called after torch
    loaded, it cannot pin any more: it then checks that the pin is already in force (ATen's capability) and
    warns if not. `enabled=False` (`runtime.reproducible: false`) leaves the environment as it is.
    """
    env = os.environ if environ is None else environ
    if not enabled:
        return False
    why = pin_unsupported()
    if why is not None:
        log.warning(
            "runtime.reproducible: %s, so the CPU kernels run natively: results are reproducible run to run on "
            "this machine, not byte-identical to an x86-64 machine's (pinned to AVX2)",
            why,
        )
        return False
    loaded = [m for m in _READERS if m in sys.modules]
    if loaded:
        if all(env.get(k) == v for k, v in PIN.items()) and _aten_capability() in ("AVX2", None):
            return True
        log.warning(
            "runtime.reproducible: %s loaded before the CPU kernels could be pinned; set %s in the environment "
            "(or start through `python -m stages.<name>` / `kdcache`) for byte-identical results",
            " and ".join(loaded),
            " ".join(f"{k}={v!r}" for k, v in PIN.items()),
        )
        return False
    env.update(PIN)
    return True


def _aten_capability() -> str | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 (an older torch without the query)
        return None


def describe() -> str:
    """One line for logs and reports: which kernels this process runs."""
    pinned = all(os.environ.get(k) == v for k, v in PIN.items())
    return "CPU kernels pinned to AVX2 (runtime.reproducible)" if pinned else "CPU kernels native"
