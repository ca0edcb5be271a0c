#!/usr/bin/env bash
# The regime study from start to end (REPRODUCTION.md, "When does it help?"), resumable: run it
# again after a kill or on a fresh checkout and it continues where the stores stand. The
# follow-up specs are written once, when the regime store first has what their rule needs, and
# then kept (their alphas are measured, so regenerating them is not a no-op).
#   CURVREG_DATA=... bash sweeps/run_regime_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m curvreg sweep sweeps/regimes.yaml --workers 2 --threads 1
[ -f sweeps/regimes-long.yaml ] || (cd sweeps && "$PY" make_regime_followups.py)
"$PY" -m curvreg sweep sweeps/regimes-long.yaml --workers 2 --threads 1
"$PY" -m curvreg sweep sweeps/ablation-group-size.yaml --workers 2 --threads 1
