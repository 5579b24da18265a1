#!/usr/bin/env bash
# Install everything (idempotent) and run the test suite.
#   bash scripts/test.sh              every lane (what CI runs)
#   bash scripts/test.sh --fast       the unit lane: one process per test, what to run after each change
#   bash scripts/test.sh --lane dist  one lane (unit, dist, slurm, gpu: see tests/conftest.py)
# Other arguments go to pytest (e.g. -k vsgd, tests/test_zero.py).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [[ $a == --fast ]]; then args+=(--lane unit); else args+=("$a"); fi
done
bash scripts/setup.sh --dev
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q ${args[@]+"${args[@]}"}
