"""Turn ZeroOptimizer shards into per-parameter full tensors and back (any world size).

`consolidate(state_dicts)` takes every rank's `ZeroOptimizer.state_dict()` and returns
`{param_name: {"master": fp32 tensor, state_key: tensor or number}}` with tensors in the
parameter's shape; counters such as `step` stay as saved. `shard_from_full(full, optimizer)`
cuts that back into a state_dict for `optimizer`'s rank, world size and bucket layout.
"""
from __future__ import annotations

from typing import Any

import torch

from vsgd_dist.sharding.layout import from_memory_flat, is_per_element, owned_part, to_memory_flat
from vsgd_dist.sharding.zero import STATE_DICT_FORMAT, ZeroOptimizer


def consolidate(state_dicts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Full per-parameter optimizer state from all ranks' shards of one ZeroOptimizer."""
    world_size = state_dicts[0]["world_size"]
    ranks = sorted(sd["rank"] for sd in state_dicts)
    if ranks != list(range(world_size)) or any(sd["format"] != STATE_DICT_FORMAT for sd in state_dicts):
        raise ValueError(f"consolidate needs one ZeroOptimizer state_dict per rank 0..{world_size - 1}, "
                         f"got ranks {ranks}")
    first = state_dicts[0]
    full: dict[str, dict[str, Any]] = {}
    for name, meta in first["params"].items():
        group_state = first["state"][meta["group"]]
        numel = meta["range"][1] - meta["range"][0]
        entry: dict[str, Any] = {}
        for key, value in group_state.items():
            if not is_per_element(value, group_state["master"].shape):
                entry[key] = value
                continue
            flat = value.new_zeros(numel)
            for sd in state_dicts:
                part = sd["params"][name]
                lo, hi = (o - meta["range"][0] for o in part["owned"])
                flat[lo:hi] = sd["state"][meta["group"]][key][part["shard_range"][0]:part["shard_range"][1]]
            entry[key] = from_memory_flat(flat, tuple(meta["shape"]), tuple(meta["dim_order"])).contiguous()
        full[name] = entry
    return full


def shard_from_full(full: dict[str, dict[str, Any]], optimizer: ZeroOptimizer,
                    param_groups: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A state_dict for `optimizer` (its rank and layout) holding the state in `full`.

    Hyperparameters come from `param_groups` (e.g. the saved `state_dict()["param_groups"]`)
    or else from `optimizer`'s current groups. Parameters missing from `full`, or a missing
    "master", keep the optimizer's current values.
    """
    state_dict = optimizer.state_dict()
    if param_groups is not None:
        state_dict["param_groups"] = [{**saved, "param_names": mine["param_names"]}
                                      for saved, mine in zip(param_groups, state_dict["param_groups"])]
    shards = []
    for group_index, current in enumerate(state_dict["state"]):
        master = current["master"]
        slots = [(i, s) for i, s in enumerate(optimizer.slots) if s.group == group_index and s.name in full]
        shard: dict[str, Any] = {"master": master.clone()}
        owned = torch.zeros(master.numel(), dtype=torch.bool, device=master.device)
        for _, slot in slots:
            for key, value in full[slot.name].items():
                if not is_per_element(value, slot.shape):
                    if key in shard and not _same(shard[key], value):
                        raise ValueError(f"parameters of group {group_index} have different {key!r} "
                                         f"({shard[key]} vs {value} at {slot.name}); one shard per group "
                                         "needs one value: regroup the parameters")
                    shard.setdefault(key, value)
                    continue
                if key not in shard:
                    shard[key] = torch.zeros(master.numel(), dtype=value.dtype, device=master.device)
                first, last, offset = owned_part(slot, optimizer.buckets[slot.bucket], optimizer.rank)
                flat = to_memory_flat(value.to(master.device), slot.dim_order)
                shard[key][offset:offset + last - first] = flat[first:last]
                owned[offset:offset + last - first] = True
        _fill_padding(shard, owned)
        shards.append(shard)
    state_dict["state"] = shards
    return state_dict


def _fill_padding(shard: dict[str, Any], owned: torch.Tensor) -> None:
    """Give the padding elements of each per-element state the values of an owned element.
    Padding only ever sees zero gradients; zeros as its state would be outside many
    optimizers' domain (VSGD divides by its rates) and turn into NaN, which no checkpoint
    may hold, while a real element's state stays finite under zero gradients."""
    if owned.all() or not owned.any():
        return
    source = int(owned.nonzero()[0])
    for key, value in shard.items():
        if key != "master" and is_per_element(value, owned.shape):
            value[~owned] = value[source]


def _same(a: Any, b: Any) -> bool:
    return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
