#!/usr/bin/env bash
# The main job: install (idempotent), train the digits demo with VSGD and with sharded
# AdamW (native ZeRO-2, 2 processes each), then compare them from the TensorBoard logs.
# Re-running resumes each run from its checkpoint (a finished run only re-validates).
# Extra arguments are recipe overrides for both runs: bash scripts/demo.sh max_steps=20
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${DEMO_OUT:-runs/demo}
for optimizer in vsgd adamw; do
  .venv/bin/python -m launch run recipes/demo.yaml --nproc 2 optimizer="$optimizer" out="$OUT/$optimizer" "$@"
done
.venv/bin/python -m launch compare "$OUT/vsgd" "$OUT/adamw" --out "$OUT/report"
