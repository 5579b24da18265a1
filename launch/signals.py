"""Signals of `launch run`: a stop request reaches every rank, and no rank outlives the launcher.

SIGTERM, SIGINT or SIGHUP to the launcher is forwarded to every rank. A rank that receives one
asks its trainer to stop: the ranks agree on the next step boundary (as on SLURM's USR2),
each writes its shard of the checkpoint, and the launcher prints one line naming it. A second
signal kills the ranks at once. Each rank also has the kernel SIGKILL it when the launcher
dies (PR_SET_PDEATHSIG), so a launcher killed with SIGKILL leaves no rank training on.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(Exception):
    """A stop signal the ranks could not act on: none was running yet, or it came twice."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; elsewhere a no-op)."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None or prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return
    if os.getppid() != parent_pid:  # the parent was gone before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def stop_on_signals(request_stop, signals: tuple = STOP_SIGNALS) -> None:
    """In a rank: a stop signal calls `request_stop` (save at the agreed step, then return)
    instead of raising KeyboardInterrupt or ending the process."""
    for sig in signals:
        signal.signal(sig, lambda signum, frame: request_stop())


class ForwardSignals:
    """In the launcher: forward stop signals to every rank (this process's multiprocessing
    children). `received` holds the first signal's number; a signal with no rank running, or
    a second one, kills the ranks and raises Interrupted."""

    def __enter__(self) -> "ForwardSignals":
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        ranks = multiprocessing.active_children()
        if self.received is not None or not ranks:
            for rank in ranks:
                rank.kill()
            raise Interrupted(signum)
        self.received = signum
        for rank in ranks:
            os.kill(rank.pid, signum)
