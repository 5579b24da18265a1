"""The callable that every SLURM task of a `launch submit`/`sweep` job runs.

SLURM delivers the requeue signal (USR2) to the main thread at an arbitrary point, maybe in
the middle of a collective, and a checkpoint of sharded optimizer state needs every rank.
So the trainer runs in a worker thread while the main thread only waits (and so handles
signals at once). submitit calls `checkpoint()` on global rank 0 only: it asks the trainer to
stop, the trainer all-reduces that flag at the next step boundary so every rank stops at the
same step and writes its shard, and rank 0 then returns a resubmission of this callable.
Ranks other than 0 wait to be killed by the requeue.

Trainer contract: `factory(recipe: dict, run_dir: str)` returns an object with
`run() -> dict` (at least "status": "completed" | "stopped", and "step"; resumes from the
latest checkpoint in run_dir) and a thread-safe `request_stop()`.

A task whose trainer completed ends without Python's interpreter teardown (see
`exit_after_result`): threads still alive then can abort the process after the work is done
("terminate called without an active exception"), and SLURM would report a finished run
as FAILED.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import submitit
from submitit.core.utils import pickle_load
from submitit.helpers import Checkpointable, DelayedSubmission

INTERRUPTIONS_FILE = "interruptions.json"
CANCEL_FILE = "cancel_requested"
"""Written by `launch cancel` into a job's folder before it sends USR2: the job then saves
its checkpoint as on a preemption, and cancels itself instead of requeueing."""


def load_factory(path: str) -> Callable[[dict, str], Any]:
    """"package.module:attr" -> the object (the trainer factory)."""
    module, sep, attr = path.partition(":")
    if not sep:
        raise ValueError(f"trainer factory {path!r} must look like package.module:Name")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def timed_out(started: float, timeout_min: int) -> bool:
    """submitit's own rule (SignalHandler.has_timed_out), so our count agrees with its log:
    a signal after min(80 % of the limit, limit - 10 min) of run time is a timeout,
    anything earlier is a preemption."""
    limit_s = timeout_min * 60
    return time.time() - started >= min(0.8 * limit_s, limit_s - 600)


def record_interruption(job_dir: Path, kind: str, job_id: str, step: Any) -> list[dict]:
    """Append one interruption to job_dir/interruptions.json and return the whole list."""
    path = job_dir / INTERRUPTIONS_FILE
    events = json.loads(path.read_text()) if path.exists() else []
    events.append({"kind": kind, "job_id": job_id, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(events, indent=1))
    os.replace(tmp, path)
    return events


def hang_timeout_s(recipe: dict) -> float:
    """The recipe's train.hang_timeout_s (0, no watchdog, for trainers whose recipe has none)."""
    train = recipe.get("train")
    return float(train.get("hang_timeout_s") or 0) if isinstance(train, dict) else 0.0


def check_master_addr(master_addr: str, num_nodes: int) -> None:
    """On a job over several nodes, exit with one line if MASTER_ADDR is a loopback address
    here (a hosts file mapping a node's name to 127.x): the other nodes could never reach
    rank 0, and gloo would only fail later with a connection error."""
    if num_nodes < 2:
        return
    here = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(master_addr, None)}
    except socket.gaierror as e:
        raise SystemExit(f"launch: error: MASTER_ADDR {master_addr} does not resolve on {here} ({e.strerror})")
    loopback = sorted(a for a in addresses if ipaddress.ip_address(a.partition("%")[0]).is_loopback)
    if loopback:
        raise SystemExit(f"launch: error: MASTER_ADDR {master_addr} resolves to the loopback address "
                         f"{loopback[0]} on {here}, but the job spans {num_nodes} nodes; map {master_addr} "
                         "to its network address (/etc/hosts or DNS)")


def exit_after_result(result_pickle: Path) -> None:
    """At interpreter exit, once submitit has saved a successful result: flush the logs and
    end the process with status 0 at once. Python 3.11's teardown kills daemon threads with
    pthread_exit and then destroys C++ objects that threads may still use (gloo and TCPStore
    threads of a process group that parameter hooks keep alive, the data loader's iterator
    of the last, cut epoch, OpenMP/TBB pools); that aborts now and then, after the work is
    done. Registered after the other atexit handlers, so it runs first, while every thread
    is still intact."""
    def exit_now() -> None:
        if not result_pickle.is_file() or pickle_load(result_pickle)[0] != "success":
            return  # submitit failed after us: keep the normal exit and its status
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(exit_now)


def cancel_self(job_id: str) -> None:
    """End this job (state CANCELLED) once its checkpoint is saved: `launch cancel` asked for
    it. Waits to be killed, as the other ranks do."""
    print("launch: cancelled by launch cancel; the checkpoint is saved", flush=True)
    subprocess.run(["scancel", job_id], check=False, timeout=60)
    time.sleep(600)
    raise RuntimeError(f"scancel {job_id} did not end the job")


class TrainJob(Checkpointable):
    """One training run; pickled by submitit and run by every task of the job."""

    def __init__(self, factory: str, recipe: dict, run_dir: str, job_dir: str, timeout_min: int,
                 max_preemptions: int, signal_delay_s: int) -> None:
        self.factory = factory
        self.recipe = recipe
        self.run_dir = run_dir
        self.job_dir = job_dir
        self.timeout_min = timeout_min
        self.max_preemptions = max_preemptions
        self.signal_delay_s = signal_delay_s
        self._reset()

    def _reset(self) -> None:
        self._trainer: Any = None
        self._thread: threading.Thread | None = None
        self._outcome: dict[str, Any] = {}
        self._started = time.time()

    def __getstate__(self) -> dict:
        """Pickle the configuration only: the trainer and its thread die with the process."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _work(self) -> None:
        try:
            self._outcome["summary"] = self._trainer.run()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            self._outcome["error"] = e

    def __call__(self) -> dict:
        self._started = time.time()
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True)
        job_env = submitit.JobEnvironment()
        check_master_addr(dist_env.master_addr, job_env.num_nodes)
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        print(f"launch: rank {dist_env.rank}/{dist_env.world_size} on {job_env.hostname} master "
              f"{dist_env.master_addr}:{dist_env.master_port} run_dir {self.run_dir}", flush=True)
        from launch.watchdog import TaskWatchdog  # here: it imports torch, which `launch submit` does not need
        from vsgd_dist.train.run_lock import RunLock

        # global rank 0 holds the run folder's lock (a requeued attempt of this job takes it over)
        with RunLock(self.run_dir) if dist_env.rank == 0 else contextlib.nullcontext():
            self._trainer = load_factory(self.factory)(self.recipe, self.run_dir)
            self._thread = threading.Thread(target=self._work, name="trainer", daemon=True)
            self._thread.start()
            watchdog = TaskWatchdog(job_env.paths.folder, job_env.job_id, dist_env.rank, dist_env.world_size,
                                    hang_timeout_s(self.recipe))
            while self._thread.is_alive():
                self._thread.join(timeout=1)  # short waits: signal handlers run between them
                verdict = watchdog.check(getattr(self._trainer, "step", None))
                if verdict:  # the trainer thread is stuck in a collective: end the process now
                    print(f"launch: error: {verdict}", file=sys.stderr, flush=True)
                    sys.stdout.flush()
                    os._exit(1)
        if "error" in self._outcome:
            raise self._outcome["error"]
        summary = self._outcome["summary"]
        print(f"launch: trainer returned {summary}", flush=True)
        if summary.get("status") == "completed" or summary.get("stopped_by") == "stop_at":
            exit_after_result(job_env.paths.result_pickle)
            return summary
        if summary.get("status") == "stopped" and dist_env.rank != 0:
            # Rank 0 is requeueing the job; the requeue kills this task. Waiting longer than
            # SLURM's own grace period means the requeue never came.
            time.sleep(max(60, self.signal_delay_s))
            raise RuntimeError("trainer stopped for a requeue, but the job was not requeued")
        return summary

    def checkpoint(self) -> DelayedSubmission | None:
        """Called by submitit on global rank 0 when USR2 arrives: save, then requeue (or, after
        `launch cancel`, cancel the job)."""
        cancelled = (Path(self.job_dir) / CANCEL_FILE).is_file()
        kind = "cancel" if cancelled else "timeout" if timed_out(self._started, self.timeout_min) else "preemption"
        step = None
        if self._thread is not None and self._thread.is_alive():
            self._trainer.request_stop()
            self._thread.join(timeout=max(30, self.signal_delay_s))
            step = (self._outcome.get("summary") or {}).get("step")
        job_id = submitit.JobEnvironment().job_id
        events = record_interruption(Path(self.job_dir), kind, job_id, step)
        print(f"launch: {kind} of job {job_id}; trainer stopped at step {step}", flush=True)
        if "error" in self._outcome:
            print(f"launch: not requeueing, the trainer failed: {self._outcome['error']!r}", flush=True)
            return None
        if cancelled:
            cancel_self(job_id)
        preemptions = sum(e["kind"] == "preemption" for e in events)
        if kind == "preemption" and preemptions > self.max_preemptions:
            print(f"launch: not requeueing after {preemptions} preemptions "
                  f"(max_preemptions={self.max_preemptions} in the cluster profile)", flush=True)
            return None
        return DelayedSubmission(self)
