#!/usr/bin/env bash
# The main job: dense allreduce against EF21 Top-k 1% on scikit-learn's digits, 4 ranks on CPU/gloo.
# Extra arguments go to examples/train_digits.py (e.g. --methods dense,ef21,ef,plain --steps 600).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank (the script sets it too)
exec .venv/bin/torchrun --standalone --nproc-per-node "${NPROC:-4}" examples/train_digits.py "$@"
