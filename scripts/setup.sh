#!/usr/bin/env bash
# Idempotent install of the virtual environment at .venv.
#   bash scripts/setup.sh                       runtime dependencies, torch's CPU build (constraints.txt)
#   bash scripts/setup.sh --dev                 runtime + test dependencies
#   bash scripts/setup.sh --torch cuda          torch's CUDA build from the package index instead
#   bash scripts/setup.sh --wheelhouse DIR      everything from DIR (scripts/wheelhouse.sh), pip --no-index:
#                                               no network, no compiler, no system packages
# As root on Debian it installs what ffcv's build needs with apt-get; without root it never
# does: it checks, and names what is missing and the ways out (scripts/ffcv_build.sh).
# The torch build a venv was installed with is kept (.venv/torch-variant) for later calls.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
TORCH=$(cat .venv/torch-variant 2>/dev/null || echo cpu)  # what this venv was installed with
WHEELHOUSE=
while (($#)); do
  case "$1" in
    --dev) DEV=1 ;;
    --torch) TORCH=${2:-}; shift ;;
    --wheelhouse) WHEELHOUSE=${2:-}; shift ;;
    *) echo "setup: unknown option '$1'; use --dev, --torch cpu|cuda, --wheelhouse DIR" >&2; exit 2 ;;
  esac
  shift
done
[[ "$TORCH" == cpu || "$TORCH" == cuda ]] || { echo "setup: --torch takes cpu or cuda, got '$TORCH'" >&2; exit 2; }
if [[ -n "$WHEELHOUSE" ]]; then
  [[ -d "$WHEELHOUSE" ]] || { echo "setup: --wheelhouse $WHEELHOUSE is not a folder; build one with bash scripts/wheelhouse.sh $WHEELHOUSE" >&2; exit 2; }
  WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
  [[ -e "$WHEELHOUSE/torch-variant" ]] && TORCH=$(cat "$WHEELHOUSE/torch-variant")
fi
source scripts/ffcv_build.sh

# --- virtual environment ------------------------------------------------------------------
# A venv whose creation was interrupted has no pip: make it again.
.venv/bin/python -m pip --version >/dev/null 2>&1 || python3 -m venv --clear .venv
CONSTRAINTS=constraints.txt
if [[ "$TORCH" == cuda ]]; then
  # the same torch release without the CPU pin: the package index's default build is CUDA's
  CONSTRAINTS=.venv/constraints-cuda.txt
  sed 's/^torch==\([^+]*\)+cpu$/torch==\1/' constraints.txt >"$CONSTRAINTS"
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")
[[ -n "$WHEELHOUSE" ]] && PIP+=(--no-index --find-links "$WHEELHOUSE")
variant=; [[ "$TORCH" == cuda ]] && variant=cuda-
stamp=.venv/.installed-$variant$(cat requirements.txt constraints.txt pyproject.toml | sha1sum | cut -c1-12)
if [[ ! -e "$stamp" ]]; then
  if [[ -z "$WHEELHOUSE" ]] && ! .venv/bin/python -c "import ffcv" 2>/dev/null; then
    ffcv_build_env  # ffcv builds from source: its headers, or one line saying what is missing
  fi
  # pip takes an installed 2.13.0+cpu for torch==2.13.0: switching a venv to CUDA removes it first
  if [[ "$TORCH" == cuda ]] && .venv/bin/python -m pip show torch 2>/dev/null | grep -q '^Version: .*+cpu$'; then
    .venv/bin/python -m pip uninstall -q -y torch
  fi
  # numpy first: ffcv's setup.py imports it at build time.
  "${PIP[@]}" torch==2.13.0 numpy wheel setuptools
  DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation -r requirements.txt
  # torchvision 0.28 has no CPU wheel; its CUDA wheel works on CPU torch through the
  # guarded shim in vsgd_dist/models/_torchvision.py. --no-deps keeps torch pinned.
  "${PIP[@]}" --no-deps torchvision==0.28.0
  "${PIP[@]}" --no-deps --no-build-isolation -e .
  echo "$TORCH" >.venv/torch-variant
  touch "$stamp"
fi
if ((DEV)); then
  dstamp=.venv/.installed-dev-$(sha1sum requirements-dev.txt | cut -c1-12)
  [[ -e "$dstamp" ]] || { "${PIP[@]}" -r requirements-dev.txt && touch "$dstamp"; }
fi
TORCH_VARIANT=$TORCH .venv/bin/python - <<'PY'
import os
import shutil
import subprocess

import torch

if os.environ["TORCH_VARIANT"] == "cpu":
    assert torch.__version__.endswith("+cpu") or torch.cuda.is_available(), f"unexpected torch {torch.__version__}"
else:
    gpu_visible = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    if torch.version.cuda is None:
        raise SystemExit(f"setup: --torch cuda installed torch {torch.__version__}, a build without CUDA")
    if gpu_visible and not torch.cuda.is_available():
        raise SystemExit(f"setup: a GPU is visible (nvidia-smi) but torch {torch.__version__} (CUDA "
                         f"{torch.version.cuda}) cannot use it: check the driver against that CUDA version")
PY
