#!/usr/bin/env bash
# One command for a machine with a GPU: the project's speed ratios on it, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # full sizes (run it on a GPU machine with the project installed)
#   bash benchmarks/gpu_check.sh --quick    # tiny sizes: a smoke run (the test suite runs this on CPU)
#
# Prints, on CUDA when a device is visible (else on CPU, saying so):
#   1. teach throughput vs bare teacher inference            (benchmarks/bench_store.py --only teach)
#   2. cached KD vs CE-only student samples/s, offline vs online speed-up, and the loop-overhead breakdown
#      per phase next to the in-memory step                  (benchmarks/bench_distill.py)
#   3. CMKD vs KD, as % of a student step (benchmarks/bench_losses.py; on a GPU the teacher side's soft
#      rank runs torchsort's CUDA kernel, the default student side is fused torch ops)
# CUDA-only parts are skipped with a line that says why. Environment: PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$arg' (known: --quick, --help)" >&2; exit 2 ;;
  esac
done
export DVC_NO_ANALYTICS=1 KDCACHE_LOG="${KDCACHE_LOG:-ERROR}"

if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  device=cuda
  "$py" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
else
  device=cpu
  echo "device: cpu (no CUDA device visible: the CUDA-only parts are skipped; every ratio is the CPU one)"
fi
if [ "$quick" = 1 ]; then
  teach=(--teach-n 1000 --repeats 1)
  distill=(--pairs cifar --cifar-shards 1 --cifar-teacher resnet8 --repeats 1 --step-seconds 0.3)
  losses=(--classes 100 --rounds 3 --warmup 1)
else
  teach=(--teach-n 20000 --repeats 3)
  distill=(--pairs default cifar --repeats 2)
  losses=(--classes 100 1000 --rounds 20)
fi

echo; echo "=== 1. teach vs bare inference ($device)"
"$py" -m benchmarks.bench_store --only teach --device "$device" "${teach[@]}"

echo; echo "=== 2. student loop: cached KD vs CE, offline vs online, per-phase breakdown ($device)"
"$py" -m benchmarks.bench_distill --device "$device" "${distill[@]}"

echo; echo "=== 3. CMKD vs KD"
if [ "$device" = cuda ]; then
  if "$py" -c "import torch, torchsort; torchsort.soft_rank(torch.randn(2, 3, device='cuda'))" 2>/dev/null; then
    "$py" -m benchmarks.bench_losses --device cuda --no-breakdown "${losses[@]}"
  else
    echo "skip: torchsort was built without its CUDA kernel; reinstall with KDCACHE_CUDA_EXT=1 bash scripts/install.sh"
  fi
else
  echo "skip: CMKD with torchsort's CUDA kernel needs a GPU; the CPU kernel instead:"
  "$py" -m benchmarks.bench_losses --device cpu --no-breakdown "${losses[@]}"
fi
echo; echo "gpu_check: done ($device)"
