"""Where each parameter lives in the flat buffers that ZeRO shards.

Parameters are packed per (param group, dtype) into buckets of at most `bucket_cap_bytes`
(a larger parameter gets a bucket of its own), filled in reverse registration order so that
a bucket's gradients become ready together during backward. Each bucket is padded to a
multiple of the world size and split evenly at element granularity: rank r owns elements
[r * n / W, (r + 1) * n / W) of the padded bucket. Padding is at most W - 1 elements per
bucket. A rank's shard of a group is the concatenation of its parts of the group's buckets.

Elements are laid out in each parameter's memory order (`dim_order`), so channels_last
parameters can live in a flat buffer as views with their own strides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """One parameter's place: elements [start, end) of bucket `bucket`."""

    name: str
    group: int
    bucket: int
    start: int
    end: int
    shape: tuple[int, ...]
    dim_order: tuple[int, ...]  # dims from outermost to innermost in memory


@dataclass(frozen=True)
class Bucket:
    """A flat buffer of one group's parameters of one dtype, padded to a multiple of W."""

    group: int
    dtype: torch.dtype
    numel: int
    padded_numel: int
    world_size: int
    shard_offset: int  # where this bucket's shard starts in the group's flat shard
    slots: tuple[int, ...]  # indices into the slot list, in bucket order

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def owned(self, rank: int) -> tuple[int, int]:
        return rank * self.shard_numel, (rank + 1) * self.shard_numel


def memory_dim_order(tensor: torch.Tensor, name: str) -> tuple[int, ...]:
    """Dims sorted by stride (outermost first); raise unless the tensor is dense."""
    order = tuple(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    if not tensor.permute(order).is_contiguous():
        raise ValueError(f"parameter {name} is not dense in memory (strides {tensor.stride()}): "
                         "make it contiguous or channels_last before building the optimizer")
    return order


def to_memory_flat(tensor: torch.Tensor, dim_order: tuple[int, ...]) -> torch.Tensor:
    """The tensor's elements as 1-D in the parameter's memory order (a view when possible)."""
    return tensor.permute(dim_order).reshape(-1)


def from_memory_flat(flat: torch.Tensor, shape: tuple[int, ...], dim_order: tuple[int, ...]) -> torch.Tensor:
    """A view of `flat` with the parameter's shape and its memory order's strides."""
    inverse = sorted(range(len(dim_order)), key=lambda d: dim_order[d])
    return flat.view([shape[d] for d in dim_order]).permute(inverse)


def plan(groups: list[list[tuple[str, torch.Tensor]]], world_size: int,
         bucket_cap_bytes: int) -> tuple[list[Slot], list[Bucket]]:
    """Slots in parameter registration order, and the evenly sharded buckets."""
    slots: dict[int, Slot] = {}
    buckets: list[Bucket] = []
    first_index = 0
    for group_index, named in enumerate(groups):
        shard_offset = 0
        for dtype in dict.fromkeys(p.dtype for _, p in named):
            members = [(first_index + i, n, p) for i, (n, p) in reversed(list(enumerate(named)))
                       if p.dtype == dtype]
            cap = max(1, bucket_cap_bytes // torch.empty((), dtype=dtype).element_size())
            chunks: list[list[tuple[int, str, torch.Tensor]]] = [[]]
            filled = 0
            for member in members:
                if chunks[-1] and filled + member[2].numel() > cap:
                    chunks.append([])
                    filled = 0
                chunks[-1].append(member)
                filled += member[2].numel()
            for chunk in chunks:
                start = 0
                for index, name, param in chunk:
                    slots[index] = Slot(name, group_index, len(buckets), start, start + param.numel(),
                                        tuple(param.shape), memory_dim_order(param, name))
                    start += param.numel()
                padded = -(-start // world_size) * world_size
                buckets.append(Bucket(group_index, dtype, start, padded, world_size, shard_offset,
                                      tuple(index for index, _, _ in chunk)))
                shard_offset += padded // world_size
        first_index += len(named)
    return [slots[i] for i in range(first_index)], buckets


def owned_part(slot: Slot, bucket: Bucket, rank: int) -> tuple[int, int, int]:
    """(first, last) element of `slot` owned by `rank`, relative to the slot, and where that
    part starts in the rank's group shard; first == last when the rank owns none of it."""
    lo, hi = bucket.owned(rank)
    first, last = max(slot.start, lo), min(slot.end, hi)
    if first >= last:
        return 0, 0, 0
    return first - slot.start, last - slot.start, bucket.shard_offset + first - lo


def is_per_element(value, shape: torch.Size | tuple) -> bool:
    """A state tensor with one entry per element of a tensor of `shape` (a parameter, or a
    flat shard), as opposed to a counter such as `step`."""
    return torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(shape)
