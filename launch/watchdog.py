"""Step watchdogs of `launch run` and of SLURM tasks (TaskWatchdog): a run in which no rank completes a step for
train.hang_timeout_s seconds ends with a message naming the stalled rank, instead of hanging
until the process-group timeout (or forever: a frozen rank times nothing out).

Each rank runs a small thread that publishes, every BEAT_S, its pid, the time and its last
completed step into an array shared with the launcher. The watchdog arms at the first step a
rank completes, and when no step follows for the timeout it blames the ranks that are stopped
(SIGSTOP, a debugger: /proc says so) or whose thread fell silent; when every rank is alive, a
collective or the data pipeline hangs. Then it kills the ranks.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch.multiprocessing as mp

FIELDS = 4  # per rank: pid, time of its last beat, last completed step, time that step completed
BEAT_S = 1.0
SILENT_S = 10.0
"""A rank whose heartbeat thread is silent this long is stalled."""


def heartbeats(world_size: int):
    """The array the ranks publish into (shared memory, passed to each rank)."""
    return mp.get_context("spawn").Array("d", FIELDS * world_size, lock=False)


def publish(slots, rank: int, last_step: Callable[[], int | None]) -> None:
    """In a rank: start the thread that publishes `last_step()` (None until training starts)."""
    def run() -> None:
        seen = None
        while True:
            now, step = time.time(), last_step()
            slots[FIELDS * rank], slots[FIELDS * rank + 1] = os.getpid(), now
            if step is not None and seen is not None and step != seen:  # completed here, not resumed
                slots[FIELDS * rank + 2], slots[FIELDS * rank + 3] = step, now
            seen = step if step is not None else seen
            time.sleep(BEAT_S)

    threading.Thread(target=run, name="heartbeat", daemon=True).start()


class Watchdog:
    """In the launcher, around the ranks' lifetime: kill them when no step completes for
    `timeout_s` (0: never); `verdict` then says which rank stalled."""

    def __init__(self, slots, world_size: int, timeout_s: float):
        self.slots, self.world_size, self.timeout_s = slots, world_size, timeout_s
        self.verdict: str | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "Watchdog":
        if self.timeout_s > 0:
            threading.Thread(target=self._watch, name="watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _ranks(self) -> list[list[float]]:
        return [self.slots[FIELDS * r:FIELDS * (r + 1)] for r in range(self.world_size)]

    def _watch(self) -> None:
        while not self._stop.wait(BEAT_S):
            last_progress = max(r[3] for r in self._ranks())
            if last_progress and time.time() - last_progress > self.timeout_s:
                self.verdict = self._blame(self._ranks())
                for pid, *_ in self._ranks():
                    if pid > 0:  # published (0 would be this whole process group)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                return

    def _blame(self, ranks: list[list[float]]) -> str:
        now = time.time()
        stalled = [f"rank {r} (pid {int(pid)}) is {'stopped' if _stopped(pid) else f'silent for {now - beat:.0f} s'}"
                   for r, (pid, beat, _, _) in enumerate(ranks) if pid and (_stopped(pid) or now - beat > SILENT_S)]
        cause = ", ".join(stalled) if stalled else "every rank is alive, so a collective or the data pipeline hangs"
        return (f"no step completed for {self.timeout_s:g} s (train.hang_timeout_s) after step "
                f"{int(max(r[2] for r in ranks))}: {cause}; all ranks were ended")


def _stopped(pid: float) -> bool:
    """Whether the process is stopped (SIGSTOP, or traced): state T or t in /proc."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class TaskWatchdog:
    """The step watchdog of a SLURM task. Under srun no launcher shares memory with the ranks,
    so each task publishes its heartbeat (pid, host, time, last step) to its own file in the
    job's submitit folder, which every node sees, and watches its own trainer: when no step
    completes for `timeout_s` (0: never) after the first, `check` returns the verdict naming
    the ranks whose heartbeat went silent (a frozen, SIGSTOPped or lost task) or, when every
    rank beats, a hung collective. The caller then ends its task; srun --kill-on-bad-exit
    ends the others, the frozen one included."""

    def __init__(self, folder: Path, job_id: str, rank: int, world_size: int, timeout_s: float):
        self.files = [Path(folder) / f"{job_id}_{r}_heartbeat.json" for r in range(world_size)]
        self.rank, self.timeout_s = rank, timeout_s
        self.me = {"pid": os.getpid(), "host": os.uname().nodename}
        self._seen: int | None = None
        self._changes = 0
        self._last_progress: float | None = None

    def check(self, step: int | None) -> str | None:
        """Publish this rank's heartbeat; the verdict once no step completed for timeout_s."""
        now = time.time()
        if step is not None and self._seen is not None and step != self._seen:
            # The first change may be the resume (0 -> the checkpoint's step), and the first
            # step after it compiles and warms up: armed from the second change on.
            self._changes += 1
            if self._changes >= 2:
                self._last_progress = now
        self._seen = step if step is not None else self._seen
        with contextlib.suppress(OSError):  # a full disk must not end the task; the watch goes on
            tmp = self.files[self.rank].with_suffix(".tmp")
            tmp.write_text(json.dumps({**self.me, "time": now, "step": self._seen}))
            os.replace(tmp, self.files[self.rank])
        if not self.timeout_s or self._last_progress is None or now - self._last_progress <= self.timeout_s:
            return None
        stalled = []
        for r, file in enumerate(self.files):
            try:
                beat = json.loads(file.read_text())
            except (OSError, ValueError):
                stalled.append(f"rank {r} never published a heartbeat")
                continue
            if now - beat["time"] > SILENT_S:
                stalled.append(f"rank {r} (pid {beat['pid']} on {beat['host']}) is silent for "
                               f"{now - beat['time']:.0f} s")
        cause = ", ".join(stalled) if stalled else "every rank is alive, so a collective or the data pipeline hangs"
        return (f"no step completed for {self.timeout_s:g} s (train.hang_timeout_s) after step {self._seen}: "
                f"{cause}; ending the job's tasks")
