"""An optimizer's per-layer diagnostics, reduced across ranks (ZeRO, FSDP2, DeepSpeed, DDP).

What is computed comes from the optimizer's registry entry (`OptimizerEntry.diagnostics`:
the state it reads, the per-element statistics, their histogram ranges). Every engine hands
over the state it holds as pieces (whole tensors, flat slices or local shards); sums,
counts and fixed-bin histogram counts add across pieces and ranks, so one all_reduce gives
every rank the numbers an unsharded optimizer would give.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from vsgd_dist.distributed import all_reduce, gather_host_objects
from vsgd_dist.optim.registry import Diagnostics

HISTOGRAM_BINS = 64


@torch.no_grad()
def reduced_diagnostics(diagnostics: Diagnostics, pieces: Iterable, group_of: Callable[[str], str], reduce: bool,
                        device: torch.device, process_group=None):
    """Means per layer group and fixed-bin histograms of `diagnostics`' statistics.

    `pieces` are (name, *state tensors in `diagnostics.state_keys` order, hyperparameters)
    for the state this rank holds (`vsgd_dist.engines.ownership.state_pieces`). With `reduce`, one all_reduce
    (when the state is sharded) gives every rank the numbers of the unsharded optimizer.
    Returns ({group: {"count": elements, stat: mean}}, {stat: histogram counts}).
    """
    stats = tuple(diagnostics.histograms)
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(1 + len(stats), dtype=torch.float64, device=device))
    hist = torch.zeros(len(stats), HISTOGRAM_BINS, dtype=torch.float64, device=device)
    for name, *tensors, hp in pieces:
        fields = diagnostics.fields(*tensors, hp)
        row = sums[group_of(name)]
        row[0] += tensors[0].numel()
        for i, stat in enumerate(stats):
            values = fields[stat].reshape(-1)
            row[1 + i] += values.sum(dtype=torch.float64)
            transform, low, high = diagnostics.histograms[stat]
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
        table = torch.stack([sums[g] for g in groups]) if groups else torch.zeros(0, 1 + len(stats))
    table = table.cpu()
    means = {g: {"count": row[0].item(), **{stat: (row[1 + i] / row[0]).item() for i, stat in enumerate(stats)}}
             for g, row in zip(groups, table) if row[0] > 0}
    return means, {stat: hist[i] for i, stat in enumerate(stats)}
