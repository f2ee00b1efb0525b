#!/usr/bin/env bash
# The accelerator checks of issue 23 in one run of under 8 minutes (scripts/gpu_check.py says what
# each stage does). On the device machine, from the checkout's root:
#   bash scripts/gpu_check.sh            # writes $OUT/summary.json, $OUT/gpu_check.log, ...
# It needs, in ignored folders of the checkout: .whl/ (wheels the machine lacks: dm-pix,
# ml_collections, mlxtend) and .data/fashion-mnist (the idx files) + .data/gimp-patterns (.pat
# files). DDM_OOD_GPU_CHECK_REDUCED=1 runs every stage at toy sizes (the CPU dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DDM_OOD_FASHION_MNIST_DIR="${DDM_OOD_FASHION_MNIST_DIR:-$PWD/.data/fashion-mnist}"
export DDM_OOD_GIMP_PATTERNS_DIR="${DDM_OOD_GIMP_PATTERNS_DIR:-$PWD/.data/gimp-patterns}"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true) \
  > "$OUT/nvidia_smi.txt"
python3 scripts/gpu_check.py 2>&1 | tail -n 40
