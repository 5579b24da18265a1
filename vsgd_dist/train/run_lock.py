"""An exclusive lock on a run folder for the whole run: `run.lock` names its holder.

Two runs writing into one folder would duplicate every TensorBoard event and delete each
other's checkpoints in progress. The lock is a file holding the holder's host, pid, SLURM job
id and start time, created atomically as a hard link to a complete temporary file (atomic on
local file systems and on NFS, where flock may not work). The holder touches it every
HEARTBEAT_S seconds. A lock is stale, and taken over, once its holder is gone: its process is
dead (same host), its heartbeat is older than STALE_S (any host), it is an earlier attempt
of this same SLURM job (requeued), or its SLURM job no longer runs (`squeue`: a job that lost
a node, cancelled and submitted again on the nodes left, need not wait out STALE_S).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0
SLURM_ALIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
"""squeue states of a job whose processes may still write into the folder."""


class RunLocked(RuntimeError):
    """The run folder is in use by another live run; the message names it."""


class RunLock:
    """`with RunLock(run_dir):` holds the folder's lock for the block, or raises RunLocked."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
        self._stop = threading.Event()

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is broken, then created again
            if self._create():
                threading.Thread(target=self._heartbeat, name="run-lock", daemon=True).start()
                return self
            holder = self._holder()
            if holder is not None and not self._stale(holder):
                raise RunLocked(f"run folder {self.run_dir} is in use by {describe(holder)}; wait for that run "
                                f"to end (or stop it), or pick another out= folder")
            self._break(holder)
        raise RunLocked(f"run folder {self.run_dir}: another run took its lock at the same moment; try again")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if (self._holder() or {}).get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        tmp = self.run_dir / f".{LOCK_FILE}.{self.me['token']}"
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _holder(self) -> dict | None:
        """The lock's content with its heartbeat age, or None when there is no lock."""
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            content = json.loads(text)
        except ValueError:  # not written by this module: judged by its age only
            content = {}
        return {**content, "age_s": time.time() - mtime}

    def _stale(self, holder: dict) -> bool:
        if holder["age_s"] > STALE_S:
            return True
        if holder.get("job_id") and holder["job_id"] == self.me["job_id"]:
            return True
        if holder.get("host") == self.me["host"]:
            return not _alive(holder.get("pid"))
        return bool(holder.get("job_id")) and not _slurm_job_alive(str(holder["job_id"]))

    def _break(self, stale: dict | None) -> None:
        """Move the stale lock aside; if a live one replaced it meanwhile, put that back."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale.{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        with contextlib.suppress(ValueError):
            if json.loads(aside.read_text()).get("token") != (stale or {}).get("token"):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        aside.unlink()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def describe(holder: dict) -> str:
    if "pid" not in holder:
        return f"an unknown process (lock file touched {holder['age_s']:.0f} s ago)"
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    return f"pid {holder['pid']} on {holder['host']}{job} (since {holder['started']})"


def is_lock_file(name: str) -> bool:
    """The lock, or one of its short-lived helper files."""
    return name == LOCK_FILE or name.startswith(f".{LOCK_FILE}.")


def _slurm_job_alive(job_id: str) -> bool:
    """Whether SLURM may still run job `job_id`: True unless squeue says it does not (a
    squeue that fails or is missing says nothing)."""
    if not job_id.replace("_", "").isdigit():
        return True
    try:
        res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return True
    if res.returncode:
        return "Invalid job id" not in res.stderr
    return bool(SLURM_ALIVE & set(res.stdout.split()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True
