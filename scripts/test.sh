#!/usr/bin/env bash
# Set up from scratch (venv with the CPU build of torch) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[lab,test]'
export CURVREG_DATA=${CURVREG_DATA:-$(cd .. && pwd)/shared/data}
exec "$VENV/bin/python" -m pytest tests "$@"
