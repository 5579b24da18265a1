"""The install for a compute node without internet: scripts/wheelhouse.sh builds a wheelhouse
here (CPU torch, to keep it small), and a user without root, in a fresh venv, in a network
namespace where only loopback exists, installs from it with scripts/setup.sh --wheelhouse
and runs the demo. ffcv's extension must find its image libraries inside its own wheel.

Needs root (to add the user and the network namespace); the wheelhouse build needs the
package index, as any install does."""
from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER = "vsgd-offline-test"

pytestmark = [pytest.mark.dist, pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(c) for c in ("useradd", "userdel", "runuser", "unshare", "ip")),
    reason="needs root with useradd, runuser, unshare and ip (CI runs as root)")]


def _drop_user() -> None:
    """The test user and everything it still runs (a timed-out install leaves its processes)."""
    subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
    subprocess.run(["userdel", "--remove", USER], capture_output=True)


@pytest.fixture(scope="module")
def home():
    """A fresh user without root; removed with its home afterwards."""
    _drop_user()
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
    try:
        yield Path(f"/home/{USER}")
    finally:
        _drop_user()


@pytest.fixture(scope="module")
def wheelhouse(home):
    out = home / "wheels"
    res = subprocess.run(["bash", "scripts/wheelhouse.sh", str(out), "--torch", "cpu"], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "install with: bash scripts/setup.sh --wheelhouse" in res.stdout
    return out


@pytest.mark.timeout(1200)
def test_ffcv_wheel_carries_its_image_libraries(wheelhouse, tmp_path):
    (wheel,) = wheelhouse.glob("ffcv-*.whl")
    assert "manylinux" in wheel.name, wheel.name
    zipfile.ZipFile(wheel).extractall(tmp_path)
    (extension,) = (tmp_path / "ffcv").glob("_libffcv*.so")
    ldd = subprocess.run(["ldd", str(extension)], capture_output=True, text=True, check=True).stdout
    assert "not found" not in ldd, ldd
    image_libs = [ln for ln in ldd.splitlines() if any(k in ln for k in ("opencv_core", "opencv_imgproc", "turbojpeg"))]
    assert len(image_libs) == 3, ldd
    for line in image_libs:
        resolved = Path(line.split("=>")[1].split(" (")[0].strip()).resolve()
        assert resolved.parent == tmp_path / "ffcv.libs", line


@pytest.mark.timeout(1800)
def test_user_without_root_or_network_installs_from_the_wheelhouse_and_runs_the_demo(wheelhouse, home):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    repo = home / "repo"
    for name in filter(None, files):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    subprocess.run(["chown", "-R", f"{USER}:", str(home)], check=True)
    script = ("cd ~/repo && bash scripts/setup.sh --wheelhouse ~/wheels && "
              "bash scripts/demo.sh max_steps=2 train.progress=false")
    # a new network namespace has only loopback (brought up for gloo): pip cannot reach any index
    as_user = (f"ip link set lo up && exec runuser -u {USER} -- env -i HOME={home} PATH=/usr/local/bin:/usr/bin:/bin "
               f"PIP_CONFIG_FILE=/dev/null OMP_NUM_THREADS=1 bash -c '{script}'")
    res = subprocess.run(["unshare", "--net", "bash", "-c", as_user], capture_output=True, text=True, timeout=1700)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert res.stdout.count("launch run: completed at step 2") == 2, res.stdout[-3000:]
    assert (repo / "runs/demo/report/report.md").is_file()
    assert (repo / ".venv").is_dir() and (repo / ".venv").stat().st_uid != 0


def test_without_root_a_missing_build_package_is_one_line_naming_both_ways_out(tmp_path):
    """ffcv's build check as a user without root, on a machine where nothing it needs is
    found: no apt-get, one line, exit status 1."""
    script = (f"source {REPO}/scripts/ffcv_build.sh && FFCV_PREFIXES=({tmp_path}) && PATH={tmp_path} && "
              "ffcv_build_env; echo unreachable")
    res = subprocess.run(["runuser", "-u", "nobody", "--", "/bin/bash", "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stdout == "", res
    (line,) = res.stderr.splitlines()
    assert "lacks: pkg-config, g++, OpenCV core+imgproc headers and libraries, libturbojpeg headers and library;" in line
    assert "bash scripts/setup.sh --wheelhouse DIR" in line
    assert "pkg-config libopencv-core-dev libopencv-imgproc-dev libturbojpeg0-dev g++" in line
