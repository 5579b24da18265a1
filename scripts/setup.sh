#!/usr/bin/env bash
# Idempotent install for a fresh Debian 12 machine (run as root): system packages, then
# the virtual environment at .venv with torch pinned to the shipped CPU build.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --dev    runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

# --- system packages (ffcv builds against OpenCV core/imgproc and libturbojpeg) ---------
APT_PKGS=(pkg-config libopencv-core-dev libopencv-imgproc-dev libturbojpeg0-dev g++)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  # apt must never start services on these machines (see slurm/local/start.sh).
  [[ -e /usr/sbin/policy-rc.d ]] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ffcv's build asks pkg-config for "opencv4", which only the (large) libopencv-dev ships;
# ffcv uses nothing but cv::Mat and cv::resize, so a small .pc over core+imgproc suffices.
PCDIR="$ROOT/.venv-pkgconfig"
mkdir -p "$PCDIR/include/opencv2"
# Debian's opencv2/opencv.hpp includes every module it was built with (calib3d, ...), whose
# headers the two small -dev packages lack; ffcv only needs core and imgproc.
printf '#pragma once\n#include <opencv2/core.hpp>\n#include <opencv2/imgproc.hpp>\n' \
  >"$PCDIR/include/opencv2/opencv.hpp"
cat >"$PCDIR/opencv4.pc" <<PC
prefix=/usr
libdir=/usr/lib/x86_64-linux-gnu
includedir=/usr/include/opencv4
Name: OpenCV
Description: OpenCV core and imgproc (subset for ffcv)
Version: 4.6.0
Libs: -L\${libdir} -lopencv_imgproc -lopencv_core
Cflags: -I$PCDIR/include -I\${includedir}
PC
export PKG_CONFIG_PATH="$PCDIR${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

# --- virtual environment ------------------------------------------------------------------
# A venv whose creation was interrupted has no pip: make it again.
.venv/bin/python -m pip --version >/dev/null 2>&1 || python3 -m venv --clear .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt)
stamp=.venv/.installed-$(cat requirements.txt constraints.txt pyproject.toml | sha1sum | cut -c1-12)
if [[ ! -e "$stamp" ]]; then
  # numpy first: ffcv's setup.py imports it at build time.
  "${PIP[@]}" torch==2.13.0 numpy wheel setuptools
  DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation -r requirements.txt
  # torchvision 0.28 has no CPU wheel; its CUDA wheel works on CPU torch through the
  # guarded shim in vsgd_dist/models/_torchvision.py. --no-deps keeps torch pinned.
  "${PIP[@]}" --no-deps torchvision==0.28.0
  "${PIP[@]}" --no-deps -e .
  touch "$stamp"
fi
if ((DEV)); then
  dstamp=.venv/.installed-dev-$(sha1sum requirements-dev.txt | cut -c1-12)
  [[ -e "$dstamp" ]] || { "${PIP[@]}" -r requirements-dev.txt && touch "$dstamp"; }
fi
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.endswith("+cpu") or torch.cuda.is_available(), f"unexpected torch {torch.__version__}"
PY
