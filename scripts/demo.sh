#!/usr/bin/env bash
# Install everything (idempotent) and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python - <<'PY'
import torch
from vsgd_dist import VSGD

w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
opt = VSGD([w], lr=1.0)
for t in range(1, 6):
    before = w.item()
    w.grad = torch.full_like(w, 1e-2)
    opt.step()
    print(f"t={t} move={before - w.item():.7f}")
PY
