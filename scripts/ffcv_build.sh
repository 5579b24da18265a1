# Sourced by setup.sh and wheelhouse.sh: what ffcv 1.0.2's source build needs (pkg-config,
# g++, OpenCV core/imgproc and libturbojpeg with their headers), installed with apt-get as
# root on Debian, else only checked. ffcv_build_env exits with one line naming what is
# missing and the ways out; on success PKG_CONFIG_PATH finds the opencv4.pc it writes.

FFCV_APT_PKGS=(pkg-config libopencv-core-dev libopencv-imgproc-dev libturbojpeg0-dev g++)
FFCV_PREFIXES=(/usr /usr/local ${CONDA_PREFIX:+"$CONDA_PREFIX"})

# The first folder among the prefixes' include or lib folders that holds $1, or nothing.
ffcv_find() {
  local kind=$1 name=$2 prefix sub
  for prefix in "${FFCV_PREFIXES[@]}"; do
    for sub in $( [[ $kind == include ]] && echo include/opencv4 include || echo lib/x86_64-linux-gnu lib64 lib lib/aarch64-linux-gnu); do
      [[ -e "$prefix/$sub/$name" ]] && { echo "$prefix/$sub"; return; }
    done
  done
}

ffcv_build_env() {
  local missing=() p
  if ((EUID == 0)) && command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
    for p in "${FFCV_APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]})); then
      # apt must never start services on these machines (see slurm/local/start.sh).
      [[ -e /usr/sbin/policy-rc.d ]] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
      missing=()
    fi
  fi
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  command -v g++ >/dev/null || missing+=(g++)
  local cv_include cv_lib jpeg_include jpeg_lib
  cv_include=$(ffcv_find include opencv2/imgproc.hpp)
  cv_lib=$(ffcv_find lib libopencv_imgproc.so)
  jpeg_include=$(ffcv_find include turbojpeg.h)
  jpeg_lib=$(ffcv_find lib libturbojpeg.so)
  [[ -n "$cv_include" && -n "$cv_lib" ]] || missing+=("OpenCV core+imgproc headers and libraries")
  [[ -n "$jpeg_include" && -n "$jpeg_lib" ]] || missing+=("libturbojpeg headers and library")
  if ((${#missing[@]})); then
    local lacking
    lacking=$(printf '%s, ' "${missing[@]}")
    echo "setup: ffcv builds from source and this machine lacks: ${lacking%, }; either install from a wheelhouse" \
      "built where they exist (bash scripts/wheelhouse.sh DIR there, then bash scripts/setup.sh --wheelhouse DIR here)," \
      "or ask an administrator for the Debian packages ${FFCV_APT_PKGS[*]} (Red Hat: pkgconf gcc-c++ opencv-devel turbojpeg-devel)" >&2
    exit 1
  fi
  # ffcv's build asks pkg-config for "opencv4", which only the (large) full OpenCV package
  # ships; ffcv uses nothing but cv::Mat and cv::resize, so a small .pc over core+imgproc
  # suffices, with an opencv.hpp that includes only those two (Debian's pulls in every module).
  local pcdir="$PWD/.venv-pkgconfig"
  mkdir -p "$pcdir/include/opencv2"
  printf '#pragma once\n#include <opencv2/core.hpp>\n#include <opencv2/imgproc.hpp>\n' >"$pcdir/include/opencv2/opencv.hpp"
  cat >"$pcdir/opencv4.pc" <<PC
libdir=$cv_lib
includedir=$cv_include
Name: OpenCV
Description: OpenCV core and imgproc (subset for ffcv)
Version: 4
Libs: -L\${libdir} -lopencv_imgproc -lopencv_core
Cflags: -I$pcdir/include -I\${includedir} -I$jpeg_include
PC
  export PKG_CONFIG_PATH="$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
}
