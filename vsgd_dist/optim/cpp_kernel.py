"""Build a small C++ source into a shared library once per machine, and load it with ctypes.

Optimizer kernels that walk a whole list of tensors in one call need no torch headers (plain
pointers and lengths), so they build in about a second instead of the minutes that
torch.compile takes on a list of 161 tensors. The library is cached under
$XDG_CACHE_HOME/vsgd_dist (default ~/.cache/vsgd_dist) by a hash of the source, the compiler,
its flags and this CPU's instruction sets (`-march=native`): rank processes and later runs
load it without building; concurrent builds each write their own file and rename it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

# -ffp-contract=off: every multiply and add rounds on its own, so the vectorized loop body
# and the scalar tail give the same bits and results do not depend on where a tensor is cut.
# -fno-math-errno lets sqrt vectorize; it changes no result. On x86, 512-bit vectors where the
# CPU has them (GCC's -march=native prefers 256): VSGD's two divisions and square root per
# element made the 256-bit build ~10% slower here.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC") + (("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vsgd_dist"


def compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not found:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    return found


def _cpu_signature() -> str:
    """What -march=native depends on: a library built here may not run on another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def library_path(name: str, source: str, directory: Path | None = None) -> Path:
    """The built library for `source`, building it first when it is not in the cache."""
    cxx = compiler()
    key = hashlib.sha256("\0".join((source, cxx, *FLAGS, platform.machine(), _cpu_signature())).encode())
    directory = directory or cache_dir()
    path = directory / f"{name}-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, out = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.so"
        src.write_text(source)
        done = subprocess.run([cxx, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"{cxx} failed: {errors[0] if errors else f'exit code {done.returncode}'}")
        os.replace(out, path)
    return path


def load(name: str, source: str) -> ctypes.CDLL:
    return ctypes.CDLL(str(library_path(name, source)))
