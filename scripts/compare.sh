#!/usr/bin/env bash
# The fair optimizer comparison on the digits demo: VSGD, AdamW and IVON, each at 3 peak LRs
# x 3 seeds (2 processes per run, 150 steps instead of the demo's 300 to keep 27 runs short).
# 300 of the 1500 train images are held out (data.minival=300): each optimizer's LR is chosen
# on them, and the report gives val top-1 at that LR only. IVON's lr is SGD-scaled
# (rescale_lr), so it gets its own grid. Rerunning skips finished points and resumes
# interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${COMPARE_OUT:-runs/compare}
SHARED=(seed=0,1,2 max_steps=150 data.minival=300 train.progress=false --local --nproc 2 --parallel 2)
.venv/bin/python -m launch sweep recipes/demo.yaml optimizer=vsgd,adamw lr=0.003,0.01,0.03 "${SHARED[@]}" \
  --out "$OUT/vsgd_adamw"
.venv/bin/python -m launch sweep recipes/demo.yaml optimizer=ivon lr=0.01,0.03,0.1 "${SHARED[@]}" --out "$OUT/ivon"
.venv/bin/python -m launch compare "$OUT/vsgd_adamw" "$OUT/ivon" --out "$OUT/report"
