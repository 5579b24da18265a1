"""Run metrics: the TensorBoard writer (rank 0 only), time per step phase, memory."""
from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class RunLogger:
    """TensorBoard writer on rank 0; every method is a no-op on the other ranks."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: int | None = None):
        """`purge_step`: on a resume, the first step this run logs; readers hide the earlier
        events at that step or later (those a killed run logged after its last checkpoint)."""
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, counts: torch.Tensor, low: float, high: float, step: int) -> None:
        """A histogram from fixed-bin counts (already summed over ranks)."""
        if not self.writer or counts.sum() == 0:
            return
        counts = counts.double().cpu()
        edges = torch.linspace(low, high, len(counts) + 1, dtype=torch.float64)
        centers = (edges[:-1] + edges[1:]) / 2
        total = counts.sum().item()
        self.writer.add_histogram_raw(
            tag, min=low, max=high, num=int(total), sum=(counts * centers).sum().item(),
            sum_squares=(counts * centers ** 2).sum().item(), bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(), global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class StepTimer:
    """Time per phase of a step, summed between logs. On CUDA each phase is a pair of CUDA
    events read only when the totals are popped (at log time), so timing never makes the
    host wait for the GPU inside a step; on the CPU it is wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            start_s = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - start_s

    def pop_ms_per_step(self, steps: int) -> dict[str, float]:
        for name, start, end in self.pending:
            end.synchronize()
            self.totals[name] += start.elapsed_time(end) / 1000
        self.pending.clear()
        out = {f"time/{k}_ms": v * 1000 / max(steps, 1) for k, v in self.totals.items()}
        self.totals.clear()
        return out


def memory_stats(device: torch.device) -> dict[str, float]:
    """CPU resident set size and, on CUDA, the peak allocated memory, in MiB."""
    stats = {}
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            stats["memory/cpu_rss_mib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    if device.type == "cuda":
        stats["memory/cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return stats
