#!/usr/bin/env bash
# Set up from scratch (venv with the CPU build of torch) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export CURVREG_DATA=${CURVREG_DATA:-$(cd .. && pwd)/shared/data}
exec "$VENV/bin/python" -m pytest tests "$@"
