"""What the SLURM tests (test_slurm.py, test_multinode.py) share: a cluster from
slurm/local/start.sh, `python -m launch` run against it, waiting for jobs, and comparing two
runs (TensorBoard scalars and checkpoint files, bitwise).

`launch` commands run without SLURM_CONF in their environment: `--cluster local` must find the
cluster by itself, through VSGD_SLURM_LOCAL (the cluster folder).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}
WALL_CLOCK_TAGS = ("time/", "memory/", "train/images_per_s")
"""TensorBoard tags that measure the machine, not the run: left out of comparisons."""


@dataclass
class Cluster:
    """A running cluster under `folder`; `env` points SLURM clients at it."""

    folder: Path
    env: dict
    started_here: bool
    submitted: list[str] = field(default_factory=list)
    """Job ids from `launch submit|sweep` (and tests that call sbatch), cancelled by `cancel_submitted`."""

    @classmethod
    def start(cls, folder: Path, *args: str, env: dict | None = None) -> "Cluster":
        """Run slurm/local/start.sh [args] folder; skip the test when it cannot (conftest.py
        turns that skip into a failure under CI=true)."""
        if os.geteuid() != 0:
            pytest.skip("the local SLURM cluster runs its daemons as root; run the tests as root")
        env = {**os.environ, **(env or {}), "VSGD_SLURM_LOCAL": str(folder)}
        env.pop("SLURM_CONF", None)
        start = subprocess.run(["bash", str(REPO / "slurm/local/start.sh"), *args, str(folder)], env=env,
                               capture_output=True, text=True, timeout=900)
        if start.returncode != 0:
            pytest.skip(f"slurm/local/start.sh could not start the cluster: {start.stderr.strip()[-500:]}")
        conf = re.search(r"SLURM_CONF=(\S+)", (folder / "env").read_text())[1]
        return cls(folder, {**env, "SLURM_CONF": conf}, "already running" not in start.stdout)

    def stop(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "slurm/local/stop.sh"), str(self.folder)], env=self.env,
                              capture_output=True, text=True, timeout=180)

    def launch(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """`python -m launch ARGS` from the repository root, as a user would type it."""
        env = {k: v for k, v in self.env.items() if k != "SLURM_CONF"}
        res = subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=timeout)
        self.submitted.extend(re.findall(r"^submitted job (?:array )?(\d+)", res.stdout, re.M))
        return res

    def slurm(self, *argv: str) -> str:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=True, timeout=60).stdout

    def states(self, jid: str) -> dict[str, str]:
        """Current state of each job (or array task) of `jid`, from sacct."""
        out = self.slurm("sacct", "-n", "-X", "-P", "-j", jid, "-o", "JobID,State")
        return {j: s.split()[0] for j, s in (line.split("|") for line in out.splitlines() if line)}

    def attempts(self, jid: str) -> list[str]:
        """States of every run of job `jid`, requeued ones included, oldest first."""
        return self.slurm("sacct", "-D", "-X", "-n", "-P", "-j", jid, "-o", "State").split()

    def jobs_of(self, job_dir: Path) -> set[str]:
        """Ids of the jobs submitted for `job_dir` (launch submit makes it the job comment),
        queued or finished; other tests' jobs on a shared cluster do not count."""
        out = (self.slurm("squeue", "-h", "-o", "%i|%k")
               + self.slurm("sacct", "-n", "-X", "-a", "-P", "-S", "now-1days", "-o", "JobID,Comment"))
        return {jid for jid, _, comment in (line.partition("|") for line in out.splitlines())
                if comment == str(job_dir.resolve())}

    def wait_done(self, jid: str, timeout: float) -> dict[str, str]:
        """Final states, once SLURM holds nothing of the job: a requeued job (NODE_FAIL,
        preemption) shows its last run's final state while it waits to run again."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            now = self.states(jid)
            if now and all(s in FINAL_STATES for s in now.values()) and "[" not in "".join(now):
                queued = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%i"], env=self.env, capture_output=True,
                                        text=True, timeout=60).stdout.strip()
                if not queued:
                    return now
            time.sleep(1)
        raise AssertionError(f"job {jid} not finished after {timeout}s: {self.states(jid)}")

    def cancel_submitted(self) -> None:
        if self.submitted:
            subprocess.run(["scancel", *self.submitted], env=self.env, capture_output=True, timeout=60)
            self.submitted.clear()


def job_id(job_dir: Path) -> str:
    return json.loads((job_dir / "job.json").read_text())["job_id"]


def wait_for(predicate, what: str, timeout: float, every: float = 0.5) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"{what} not seen after {timeout}s"
        time.sleep(every)


def wait_for_line(path_glob: str, folder: Path, pattern: str, timeout: float) -> None:
    def found() -> bool:
        return any(re.search(pattern, log.read_text(errors="replace"), re.M) for log in folder.glob(path_glob))
    wait_for(found, f"{pattern!r} in {folder}/{path_glob}", timeout, every=0.3)


# --- comparing runs -------------------------------------------------------------------------
def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run but the wall-clock ones: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if not tag.startswith(WALL_CLOCK_TAGS)}


def same_tree(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, equal bit for bit; NaN equals NaN (a
    ZeRO bucket resharded onto fewer ranks holds NaN in its padding)."""
    import torch

    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_tree, a, b))
    return a == b


UNSEEDED_RNGS = ("python", "numpy")
"""Global RNGs the trainer never seeds nor draws from: their saved states differ between
any two processes, so comparisons leave them out."""


def assert_same_checkpoint(run_a: Path, run_b: Path, step: int) -> None:
    """Both runs saved step `step` with identical contents (weights, optimizer shards,
    schedule, data position, torch RNG of every rank)."""
    from vsgd_dist.train.checkpoint import read_full

    folder_a, folder_b = checkpoint_dir(run_a, step), checkpoint_dir(run_b, step)
    a, b = read_full(folder_a), read_full(folder_b)
    for full in (a, b):
        full.pop("meta")
        for trainer in full["trainer"].values():
            for rng in UNSEEDED_RNGS:
                trainer.get("rng", {}).pop(rng, None)
    assert a["trainer"].keys() == b["trainer"].keys(), (folder_a, folder_b)
    for part in a:
        assert same_tree(a[part], b[part]), f"{folder_a} and {folder_b} differ in {part}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def assert_same_scalars(run_a: Path, run_b: Path, resumed_at: int | None = None, log_every: int = 1) -> None:
    """Both runs logged the same scalars at the same steps, bit for bit. With `resumed_at`
    (run_b stopped there and resumed), the train/loss of the logging window that straddles
    that step is left out: the trainer logs only the window's steps after the resume (its
    pending losses are not checkpointed)."""
    a, b = scalars(run_a), scalars(run_b)
    assert a.keys() == b.keys() and "train/loss" in a
    if resumed_at is not None and resumed_at % log_every:
        straddling = (resumed_at // log_every + 1) * log_every
        for runs in (a, b):
            runs["train/loss"] = [(s, v) for s, v in runs["train/loss"] if s != straddling]
    for tag in a:
        assert a[tag] == b[tag], f"{tag}: {a[tag]} != {b[tag]}"


# --- the demo recipe on SLURM ---------------------------------------------------------------
def submit_demo(cluster: Cluster, out: Path, *args: str) -> str:
    """Submit recipes/demo.yaml into job folder `out`; return the job id. The 20 min limit
    makes an early USR2 a preemption for submitit (under ~12 min it counts as a timeout)."""
    res = cluster.launch("submit", "recipes/demo.yaml", "--cluster", "local", "--time", "20", "--out", str(out),
                         *args)
    assert res.returncode == 0, res.stderr
    return job_id(out)


def preempt_after(cluster: Cluster, job_dir: Path, step: int, timeout: float = 600) -> None:
    """Send USR2 (a preemption) once the job has published its checkpoint of `step`."""
    wait_for(checkpoint_dir(job_dir / "run", step).is_dir, f"checkpoint of step {step} in {job_dir}", timeout)
    cluster.slurm("scancel", "--signal=USR2", job_id(job_dir))
