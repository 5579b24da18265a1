"""Start N local processes joined by one process group (`launch run`, tests, benchmarks).

Each rank runs `fn(rank, world_size, *args)` with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set and the default process group initialized by
`vsgd_dist.distributed.init_process_group_from_env` (the rule every launcher shares); its
return value (picklable) comes back in a list ordered by rank. A rank that raises makes the
call raise with that rank's traceback; a rank that dies without a word (killed, segfault) is
named first, ahead of the peers that fail because it vanished; a hang ends with TimeoutError
after `timeout` seconds instead of blocking forever. `ranks_per_node` numbers the ranks as
nodes of that many ranks (LOCAL_RANK = rank mod ranks_per_node), as a multi-node launcher
would, so that node layouts run on one machine.
"""
from __future__ import annotations

import os
import queue as queue_module
import signal
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from vsgd_dist.allocator import for_cpu_children
from vsgd_dist.distributed import close_process_group, free_port, init_process_group_from_env


class RankFailed(RuntimeError):
    """A rank raised or died; `rank`, `summary` (its last error line) and the traceback."""

    def __init__(self, rank: int, summary: str, details: str):
        super().__init__(f"rank {rank} failed: {summary}\n{details}")
        self.rank, self.summary = rank, summary


def _worker(rank, world_size, ranks_per_node, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank % ranks_per_node), LOCAL_WORLD_SIZE=str(ranks_per_node))
    try:
        init_process_group_from_env()
        result = fn(rank, world_size, *args)
        close_process_group()
        queue.put((rank, True, result))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, (f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc())))
        if dist.is_initialized():
            dist.destroy_process_group()


def _died(procs, reported) -> RankFailed | None:
    """The first rank that ended without reporting (killed or crashed), if any."""
    for rank, proc in enumerate(procs):
        code = proc.exitcode
        if rank not in reported and code not in (None, 0):
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return RankFailed(rank, f"{how} without reporting (killed or crashed)", "")
    return None


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float | None = 180.0,
                    ranks_per_node: int | None = None) -> list:
    """Run `fn` on `world_size` local ranks (one node, or nodes of `ranks_per_node`); return
    the per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    per_node = ranks_per_node or world_size
    procs = [ctx.Process(target=_worker, args=(r, world_size, per_node, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    with for_cpu_children():  # a caching allocator for CPU ranks, read when each starts
        for p in procs:
            p.start()
    results: dict[int, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = _died(procs, results)
                if dead is not None:
                    time.sleep(1.0)  # a dying rank may still be flushing its report
                    if queue.empty():
                        raise dead from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run of {fn.__name__} at {world_size} ranks timed out "
                                       f"after {timeout:.0f}s") from None
                continue
            if not ok:  # maybe only because a peer died: that peer is the one to name
                time.sleep(1.0)  # a peer killed outright takes a moment to be reaped
                raise _died(procs, {*results, rank}) or RankFailed(rank, *payload)
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == world_size else 1)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
