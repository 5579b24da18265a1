#!/usr/bin/env bash
# Install everything (idempotent) and run the test suite.
#   bash scripts/test.sh              every lane (what CI runs): the slurm lane beside the others
#   bash scripts/test.sh --fast       the unit lane: one process per test, what to run after each change
#   bash scripts/test.sh --lane=dist  one lane, or several: --lane=unit,dist (see tests/conftest.py)
# Other arguments go to pytest (e.g. -k vsgd, tests/test_zero.py).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [[ $a == --fast ]]; then args+=(--lane=unit); else args+=("$a"); fi
done
bash scripts/setup.sh --dev
export OMP_NUM_THREADS=1
PYTEST=(.venv/bin/python -m pytest -q)
if ((${#args[@]})); then
  exec "${PYTEST[@]}" "${args[@]}"
fi
# Everything, in two pytest processes at once (tests/conftest.py, --stream): the slurm lane
# spends much of its time waiting on the scheduler and its jobs' start-up, so it runs beside
# the other lanes, with a few long modules to even out the two. Its output follows theirs.
# Either failing fails the run; stopping this script stops both.
slurm_log=$(mktemp /tmp/vsgd-test-slurm.XXXXXX)
"${PYTEST[@]}" -p no:cacheprovider --stream=slurm >"$slurm_log" 2>&1 &
slurm=$!
trap 'kill -INT $slurm 2>/dev/null; wait $slurm; rm -f "$slurm_log"' EXIT
others=0
"${PYTEST[@]}" --stream=others || others=$?
lane=0
wait $slurm || lane=$?
trap - EXIT
echo "---------------- the second process: the slurm lane and tests/conftest.py BESIDE_SLURM ----------------"
cat "$slurm_log"
rm -f "$slurm_log"
((others == 0 && lane == 0))
