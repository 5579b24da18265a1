"""`python -m launch doctor`: every check runs for real on this machine (2 gloo processes,
an FFCV write and decode, DeepSpeed's import); a GPU profile on a machine without GPUs or
SLURM gives PROBLEM lines with their fixes and exit status 1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist  # its tests run the doctor in a subprocess (a collective on 2 CPU processes)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.dist  # the doctor runs in a subprocess and starts ranks


def doctor(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launch", "doctor", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.timeout(700)
def test_doctor_on_a_gpu_profile_without_gpu_or_slurm_names_the_problems_and_fixes():
    res = doctor("--cluster", "example-a100")
    lines = res.stdout.splitlines()
    status = {ln[8:20].strip(): ln[:8].strip() for ln in lines if ln[:8].strip() in ("ok", "PROBLEM")}
    assert set(status) == {"python", "torch", "gpus", "collective", "ffcv", "deepspeed", "slurm"}, res.stdout
    for name in ("python", "torch", "collective", "ffcv", "deepspeed"):
        assert status[name] == "ok", res.stdout + res.stderr
    assert "exact" in next(ln for ln in lines if ln[8:].startswith("collective"))
    assert "written and decoded" in next(ln for ln in lines if ln[8:].startswith("ffcv"))
    expected_problems = {"slurm"} | ({"gpus"} if "+cpu" in next(ln for ln in lines if ln[8:].startswith("torch")) else set())
    assert {n for n, s in status.items() if s == "PROBLEM"} == expected_problems, res.stdout
    for i, line in enumerate(lines):
        if line.startswith("PROBLEM"):
            assert lines[i + 1].strip().startswith("fix: "), res.stdout
    assert lines[-1] == f"launch doctor: {len(expected_problems)} problem(s)"
    assert res.returncode == 1


def test_doctor_with_an_unknown_profile_stops_in_one_line():
    res = doctor("--cluster", "nope")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("launch doctor: unknown cluster profile 'nope'") and res.stderr.count("\n") == 1
