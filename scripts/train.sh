#!/usr/bin/env bash
# Set up from scratch (venv with the CPU build of torch) and train the paper's 3x512 MLP on
# CIFAR-10 with curvature + L2. Extra arguments go to `curvreg train` (they override the preset).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[lab,test]'
if [ -z "${CURVREG_DATA:-}" ] && [ -f ../shared/data/cifar10.npz ]; then
  export CURVREG_DATA=$(cd ../shared/data && pwd)
fi
exec "$VENV/bin/curvreg" train --preset fc512-cifar10 --epochs 5 "$@"
