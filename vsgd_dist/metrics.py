"""Run metrics: TensorBoard (rank 0 only), reduced VSGD diagnostics, timing and memory."""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist

from vsgd_dist.optim.vsgd import diagnostic_fields

# Histogram bins per diagnostic: (transform, low, high); log10 for quantities spanning decades.
HISTOGRAM_BINS = 64
HISTOGRAM_RANGES = {
    "snr": ("log10", -8.0, 4.0),
    "posterior_std": ("log10", -12.0, 2.0),
    "implied_beta1": ("linear", 0.0, 1.0),
    "effective_step": ("log10", -8.0, 2.0),
}
STATS = tuple(HISTOGRAM_RANGES)


class RunLogger:
    """TensorBoard writer on rank 0; every method is a no-op on the other ranks."""

    def __init__(self, log_dir: str, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

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

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


@torch.no_grad()
def vsgd_diagnostics(pieces, group_of: Callable[[str], str], reduce: bool, device: torch.device):
    """Means per layer group and fixed-bin histograms of VSGD's diagnostics.

    `pieces` are (name, mug, bg, bhg, hyperparameters) for the state this rank holds. Sums,
    counts and histogram counts all add across shards, so one all_reduce (when the state is
    sharded) gives every rank the numbers an unsharded optimizer would give.
    Returns ({group: {stat: mean}}, {stat: counts over all groups}).
    """
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(1 + len(STATS), dtype=torch.float64, device=device))
    hist = torch.zeros(len(STATS), HISTOGRAM_BINS, dtype=torch.float64, device=device)
    for name, mug, bg, bhg, hp in pieces:
        fields = diagnostic_fields(mug, bg, bhg, lr=hp["lr"], eps=hp["eps"], ps=hp["ps"], ghattg=hp["ghattg"])
        row = sums[group_of(name)]
        row[0] += mug.numel()
        for i, stat in enumerate(STATS):
            values = fields[stat].reshape(-1)
            row[1 + i] += values.sum(dtype=torch.float64)
            transform, low, high = HISTOGRAM_RANGES[stat]
            if transform == "log10":
                values = values.clamp_min(1e-30).log10()
            hist[i] += torch.histc(values.float().clamp(low, high), HISTOGRAM_BINS, low, high).double()
    groups = sorted(sums)
    if reduce and dist.is_initialized():
        # Ranks may hold different groups: agree on the union of names first.
        all_groups: list = [None] * dist.get_world_size()
        dist.all_gather_object(all_groups, groups)
        groups = sorted(set().union(*all_groups))
        table = torch.stack([sums[g] for g in groups]) if groups else torch.zeros(0, device=device)
        packed = torch.cat([table.reshape(-1), hist.reshape(-1)])
        dist.all_reduce(packed)
        table = packed[:table.numel()].view(len(groups), -1)
        hist = packed[table.numel():].view_as(hist)
    else:
        table = torch.stack([sums[g] for g in groups]) if groups else torch.zeros(0, 1 + len(STATS))
    table = table.cpu()
    means = {g: {stat: (row[1 + i] / row[0]).item() for i, stat in enumerate(STATS)}
             for g, row in zip(groups, table) if row[0] > 0}
    return means, {stat: hist[i] for i, stat in enumerate(STATS)}


class StepTimer:
    """Wall time per phase of a step, summed between logs (synchronizes CUDA on stop)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[name] += time.perf_counter() - start

    def pop_ms_per_step(self, steps: int) -> dict[str, float]:
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


def finite_or_raise(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}: stopping; the last good checkpoint is kept "
                                 f"(lower optim.lr, set train.grad_clip, or check the data)")
