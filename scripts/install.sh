#!/usr/bin/env bash
# kdcache installer: one command from a fresh clone to a working environment.
#
#   bash scripts/install.sh            # runtime: venv + torch + kdcache + Fashion-MNIST
#   bash scripts/install.sh --test     # the same plus the test tools (pytest, hypothesis, ruff)
#
# Environment:
#   KDCACHE_VENV=path        where the virtualenv goes (default: .venv in the project root);
#                            set KDCACHE_VENV=none to install into the active Python instead.
#   KDCACHE_CUDA_EXT=1       build torchsort's CUDA kernel (needs nvcc, CUDA_HOME and
#                            TORCH_CUDA_ARCH_LIST); by default nvcc is hidden so the CPU build
#                            never trips over a CUDA toolkit without a GPU.
#   KDCACHE_SKIP_DATA=1      do not install the Debian Fashion-MNIST package.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (known: --test, --help)" >&2; exit 2 ;;
  esac
done

venv="${KDCACHE_VENV:-.venv}"
if [ "$venv" = "none" ]; then
  py=python3
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
fi
pip=("$py" -m pip --disable-pip-version-check)

# 1. torch + torchvision first: torchsort compiles against the installed torch and must not
#    get a second one from build isolation. These versions pair (torchvision's C++ ops match).
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "==> installing torch + torchvision (large download on machines without a local wheel cache)"
  "${pip[@]}" install "torch==2.14.1" "torchvision==0.29.1"
fi
"${pip[@]}" install -q "setuptools>=68" wheel

# 2. the project (and torchsort, built from source against that torch).
path_no_nvcc="$PATH"
if [ "${KDCACHE_CUDA_EXT:-0}" != "1" ]; then
  # torchsort's setup.py adds a CUDA extension whenever nvcc is on PATH; hide every such directory.
  path_no_nvcc=$(printf '%s' "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || printf '%s:' "$d"; done)
  path_no_nvcc="${path_no_nvcc%:}"
fi
echo "==> installing kdcache$extras (compiles torchsort: ~2 minutes)"
PATH="$path_no_nvcc" "${pip[@]}" install --no-build-isolation --no-cache-dir -e ".$extras"

# 3. the default data set: Fashion-MNIST IDX files from Debian's package.
fm=/usr/share/datasets/fashion-mnist
if [ "${KDCACHE_SKIP_DATA:-0}" != "1" ] && [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_=""; [ "$(id -u)" = "0" ] || sudo_="sudo"
    echo "==> installing Debian package dataset-fashion-mnist"
    $sudo_ apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq dataset-fashion-mnist; }
  else
    echo "install.sh: no apt-get here. Download the four Fashion-MNIST IDX .gz files by hand and set" >&2
    echo "            prepare.root in params.yaml to their folder." >&2
  fi
fi
echo "==> done: $("$py" -c 'import torch, torchsort, zarr; print(f"torch {torch.__version__}, zarr {zarr.__version__}")')"
