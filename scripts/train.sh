#!/usr/bin/env bash
# Set up from scratch (venv with the CPU build of torch) and train the paper's 3x512 MLP on
# CIFAR-10 with curvature + L2. Extra arguments go to `curvreg train` (they override the preset).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ -z "${CURVREG_DATA:-}" ] && [ -f ../shared/data/cifar10.npz ]; then
  export CURVREG_DATA=$(cd ../shared/data && pwd)
fi
exec "$VENV/bin/curvreg" train --preset fc512-cifar10 --epochs 5 "$@"
