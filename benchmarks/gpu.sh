#!/usr/bin/env bash
# The prepared GPU check (issue: CUDA and mixed precision), one command, under 8 minutes on one
# GPU. Runs from the repository root with the machine's own python3 (torch, timm and
# transformers installed); writes every table to $OUT (default /tmp/curvreg-gpu):
#   1. the CUDA tests: every rule case exact in float64 on the GPU, bf16 against float32, probes
#      from CUDA generators (tests/test_cuda.py), and the CPU-autocast tests (test_precision.py);
#   2. regularized / plain step ratios with CUDA-event timings and peak memory: fc512, fc4096,
#      the all-conv net (float32 and bf16 autocast), the estimators, the real models;
#   3. the conv-form calibration (GRAM_FLOP_COST for this device);
#   4. one timed All-CNN-C epoch without and with the penalty (synthetic CIFAR-10-sized data
#      when no CIFAR-10 copy is there: the cost does not depend on the pixels).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/curvreg-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() { echo; echo "=== $1 ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

step "1. CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_precision.py 2>&1 | tail -15 | tee "$OUT/tests.txt"

step "2. step ratios"
timeout 60 $PY benchmarks/bench_step.py --device cuda --rounds 20 | tee "$OUT/step.md"
timeout 60 $PY benchmarks/bench_step.py --device cuda --rounds 20 --bf16 | tee -a "$OUT/step.md"
timeout 60 $PY benchmarks/bench_estimators.py --device cuda --rounds 20 --no-noise | tee "$OUT/estimators.md"
timeout 90 $PY benchmarks/bench_zoo.py --device cuda --rounds 10 --scale 8 2>&1 | grep -v Warning | tee "$OUT/zoo.md"

step "3. conv forms"
timeout 40 $PY benchmarks/bench_conv_forms.py --device cuda --rounds 10 | tee "$OUT/conv_forms.md"

step "4. All-CNN-C epoch"
DATA=${CURVREG_DATA:-}
if [ -z "$DATA" ] || [ ! -f "$DATA/cifar10.npz" ]; then
  DATA=/tmp/curvreg-data
  $PY - "$DATA" <<'PY'
import sys
from pathlib import Path
import numpy as np
from curvreg.lab.data import save_npz
rng = np.random.default_rng(0)
save_npz(Path(sys.argv[1]) / "cifar10.npz", {
    "x_train": rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
    "y_train": rng.integers(0, 10, 50000).astype(np.int64),
    "x_test": rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8),
    "y_test": rng.integers(0, 10, 10000).astype(np.int64)})
print("synthetic CIFAR-10-sized data in", sys.argv[1])
PY
fi
for alpha in 0 5e-4; do
  rm -rf "/tmp/curvreg-epoch-$alpha"
  timeout 100 $PY -m curvreg train --preset allcnn-cifar10 --epochs 1 --alpha $alpha --device cuda \
    --data-dir "$DATA" --fisher-eval-size 256 --out "/tmp/curvreg-epoch-$alpha" --no-progress >/dev/null
  $PY -c "import json,sys; m=json.loads(open(sys.argv[1]).read().splitlines()[0]); print(f'alpha {sys.argv[2]}: epoch {m[\"epoch_seconds\"]:.1f} s, {m[\"examples_per_second\"]:.0f} examples/s')" \
    "/tmp/curvreg-epoch-$alpha/metrics.jsonl" $alpha | tee -a "$OUT/epoch.txt"
done
step "done"
