"""A short chaos run (bench/chaos.py) on its own 2-node local SLURM cluster: four faults of
four kinds, drawn from a fixed seed, injected into one demo job, which must survive them all
and end bit for bit equal to the undisturbed run, leaving nothing behind.

The kinds are the ones whose outcome does not depend on timing: a killed rank (the job fails
and is resubmitted), a preemption (requeued), the disk filling up before a save (one-line
error; the harness frees the disk and resubmits) and a checkpoint corrupted between two
attempts (one-line checksum error; the harness deletes it as told and resubmits). The long
runs, with every kind, are in docs/reliability.md.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_multinode import network_objects

REPO = Path(__file__).resolve().parents[1]
PORTS = {"SLURM_LOCAL_CTLD_PORT": "6877", "SLURM_LOCAL_SLURMD_PORT": "6878", "SLURM_LOCAL_DBD_PORT": "6879",
         "SLURM_LOCAL_DB_PORT": "3367"}
"""Its own ports (test_multinode.py's cluster may run at the same time in another lane)."""
KINDS = "kill_rank,preempt,disk_full,corrupt_ckpt"

@pytest.mark.timeout(2400)
def test_a_short_chaos_run_survives_every_fault_and_ends_bitwise_equal():
    if os.geteuid() != 0:
        pytest.skip("the chaos run starts a local SLURM cluster, mounts a tmpfs and cuts links: run as root")
    before = network_objects()
    workdir = Path(tempfile.mkdtemp(prefix="vsgd-chaos-test-", dir="/tmp"))  # short: slurmstepd's socket paths
    env = {**os.environ, **PORTS, "PYTHONPATH": str(REPO)}  # the harness picks a free address range
    for name in ("SLURM_CONF", "SLURM_LOCAL_NET"):
        env.pop(name, None)
    chaos = subprocess.Popen([sys.executable, "bench/chaos.py", "--faults", "4", "--seed", "3", "--kinds", KINDS,
                              "--workdir", str(workdir), "--time-limit", "1200"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = chaos.communicate(timeout=2000)
    except subprocess.TimeoutExpired:
        chaos.terminate()  # SIGTERM: the harness cancels its jobs, stops its cluster, unmounts
        out, err = chaos.communicate(timeout=300)
    res = subprocess.CompletedProcess(chaos.args, chaos.returncode, out, err)
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert re.fullmatch(r"chaos: 4 faults injected, 4 survived, \d+ attempts, \d+ steps recomputed, "
                        r"final state equal: yes", last), last
    attempts = int(re.search(r"(\d+) attempts", last)[1])
    assert attempts >= 4, last  # every kind here ends the attempt it hits
    for kind in KINDS.split(","):
        assert re.search(rf"^\s*{kind}\s+1\s+1$", res.stdout, re.M), res.stdout[-3000:]
    assert not workdir.exists()  # the harness deletes its work folder
    assert str(workdir) not in Path("/proc/mounts").read_text()
    assert network_objects() <= before
