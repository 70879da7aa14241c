#!/usr/bin/env bash
# GPU check: build the extension with its CUDA kernels against the machine's torch, then run every
# GPU test (CUDA vs CPU parity). Needs no network: torch, setuptools and pytest must be installed.
# Usage: bash scripts/gpu_check.sh   (prints the test summary; exit status is pytest's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
time EF21_FORCE_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
"$PY" -m ef21.info 2>/dev/null || true
"$PY" -m pytest tests -q -m gpu -p no:cacheprovider
