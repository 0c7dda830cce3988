#!/usr/bin/env bash
# Every CUDA path in at most 8 minutes on one GPU (docs/PERFORMANCE.md, "GPU check"): the CUDA
# tests, a short run of every training script with the speed flags, DDP under torchrun, the
# benchmark's CUDA rows; OUT_DIR/summary.json and OUT_DIR/summary.md. No internet, no data set:
# it writes CIFAR-100-format files itself.   usage: gpu_check.sh OUT_DIR [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
