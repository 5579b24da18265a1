"""VSGD's diagnostics per layer group, reduced across ranks (ZeRO, FSDP2, DeepSpeed, DDP).

Every engine hands over the state it holds as pieces (whole tensors, flat slices or local
shards); sums, counts and fixed-bin histogram counts add across pieces and ranks, so one
all_reduce gives every rank the numbers an unsharded VSGD would give.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from vsgd_dist.distributed import all_reduce, gather_host_objects
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


@torch.no_grad()
def reduced_diagnostics(pieces: Iterable, group_of: Callable[[str], str], reduce: bool,
                        device: torch.device, process_group=None):
    """Means per layer group and fixed-bin histograms of VSGD's diagnostics.

    `pieces` are (name, mug, bg, bhg, hyperparameters) for the state this rank holds. Sums,
    counts and histogram counts all add across shards, so one all_reduce (when the state is
    sharded) gives every rank the numbers an unsharded optimizer would give.
    Returns ({group: {"count": elements, stat: mean}}, {stat: histogram counts}).
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
        groups = sorted(set().union(*gather_host_objects(groups, process_group)))
        table = torch.stack([sums[g] for g in groups]) if groups else torch.zeros(0, device=device)
        packed = torch.cat([table.reshape(-1), hist.reshape(-1)])
        all_reduce(packed, process_group=process_group)
        table = packed[:table.numel()].view(len(groups), -1)
        hist = packed[table.numel():].view_as(hist)
    else:
        table = torch.stack([sums[g] for g in groups]) if groups else torch.zeros(0, 1 + len(STATS))
    table = table.cpu()
    means = {g: {"count": row[0].item(), **{stat: (row[1 + i] / row[0]).item() for i, stat in enumerate(STATS)}}
             for g, row in zip(groups, table) if row[0] > 0}
    return means, {stat: hist[i] for i, stat in enumerate(STATS)}
