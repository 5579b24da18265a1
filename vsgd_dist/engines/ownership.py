"""What a rank holds: each engine's answer to "which elements of each parameter are mine, and
where do they and their optimizer state live here".

`Engine.ownership()` returns an `Ownership`. Checkpoints (`vsgd_dist.train.dcp_state`)
save and load each rank's chunks of every parameter with it, diagnostics read the optimizer state through it, and
gradient transforms keep per-element state laid out like its `stores`. A parameter's
elements are counted flattened in its memory order (`dim_order`); a store's elements
flattened in its own memory order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from vsgd_dist.distributed import local_tensor
from vsgd_dist.sharding.layout import memory_dim_order, to_memory_flat


@dataclass(frozen=True)
class OwnedRange:
    """Elements [start, stop) of a parameter, at `offset` in store `store` of this rank."""

    start: int
    stop: int
    store: int
    """Index into `Ownership.stores`."""
    offset: int


@dataclass(frozen=True)
class OwnedParam:
    shape: tuple[int, ...]
    dim_order: tuple[int, ...]
    """The order its elements are counted in (dims outermost first, as in memory)."""
    group: int
    """Index of its param group in `Ownership.groups`."""
    ranges: tuple[OwnedRange, ...]
    """What this rank holds of it (possibly empty ranges: it holds none)."""


@dataclass
class Ownership:
    params: dict[str, OwnedParam]
    """Every parameter by name, in param-group order."""
    stores: list[torch.Tensor]
    """This rank's fp32 weights, one tensor per store, laid out like `Engine.reduced_grads()`
    (flat masters or partitions, or each parameter's local tensor); views, not copies."""
    state_of: Callable[[int], dict]
    """Store index -> the optimizer state kept for it ({} before the first step)."""
    fresh_state: Callable[[int], dict]
    """Store index -> a new, empty optimizer state for it, in place of the old one (a checkpoint
    load fills it)."""
    groups: list[dict]
    """The hyperparameters of each param group (the live groups the LR scheduler drives)."""
    names_per_group: list[list[str]]
    """Parameter names of each param group."""
    publish: Callable[[], None]
    """After writing into `stores`: make every rank's model compute with them (ZeRO:
    the all-gather of the masters; elsewhere the stores are the parameters)."""
    writes: bool = True
    """Whether this rank writes its pieces into checkpoints (replicas of a shard do not)."""
    shard_group: dist.ProcessGroup | None = None
    """The ranks whose pieces make up the whole: None for the world; this node's ranks with
    engine.shard_within=node (each node holds a whole copy)."""
    sharded_state: bool = True
    """Whether each rank holds only part of the optimizer state (sums then add up over
    `shard_group`)."""
    sharded_grads: bool = True
    """Whether `reduced_grads()` is only this rank's part of the gradient."""
    state_like: Callable[[int], torch.Tensor] | None = None
    """Store index -> the tensor its per-element optimizer state is laid out like (FSDP2: the
    DTensor parameter); None: the store itself."""

    def __post_init__(self):
        if self.state_like is None:
            self.state_like = lambda i: self.stores[i]


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor's local elements, 1-D in its memory order (a view)."""
    tensor = local_tensor(tensor)
    return to_memory_flat(tensor, memory_dim_order(tensor, "store"))


def state_bytes(ownership: Ownership) -> int:
    """Bytes of per-element optimizer state this rank holds (padding included)."""
    return sum(local_tensor(v).nbytes for i in range(len(ownership.stores))
               for v in ownership.state_of(i).values() if torch.is_tensor(v) and v.dim() > 0)


def state_pieces(ownership: Ownership, keys: tuple[str, ...]) -> Iterator[tuple]:
    """(parameter name, *flat state tensors `keys`, hyperparameters) for each piece of
    optimizer state this rank holds; nothing before the first step. The input of
    `vsgd_dist.optim.diagnostics.reduced_diagnostics`."""
    for name, param in ownership.params.items():
        for r in param.ranges:
            state = ownership.state_of(r.store)
            if r.start == r.stop or not state or int(state.get("step", 1)) == 0:
                continue
            if not set(keys) <= state.keys():
                raise ValueError(f"diagnostics need the state {', '.join(keys)}; the optimizer keeps "
                                 + ", ".join(sorted(state)))
            part = slice(r.offset, r.offset + r.stop - r.start)
            yield name, *(flat(state[k])[part] for k in keys), ownership.groups[param.group]


def local_weights(ownership: Ownership) -> list[torch.Tensor]:
    """The weights this rank updates, laid out like `Engine.reduced_grads()` (views: clone
    what you keep)."""
    return [local_tensor(s.detach()) for s in ownership.stores]


@torch.no_grad()
def set_local_weights(ownership: Ownership, weights: list[torch.Tensor]) -> None:
    """Copy `local_weights()`-shaped tensors in (each rank its own part); the model then
    computes with them on every rank."""
    for mine, value in zip(local_weights(ownership), weights):
        mine.copy_(value)
    ownership.publish()


@contextlib.contextmanager
def weights_swapped(ownership: Ownership, weights: list[torch.Tensor]):
    """The model computes with `weights` inside, with its own weights again after (restored
    bit for bit; costs a copy of this rank's weights while inside)."""
    current = [w.clone() for w in local_weights(ownership)]
    set_local_weights(ownership, weights)
    try:
        yield
    finally:
        set_local_weights(ownership, current)


def whole_params(named: list[tuple[str, torch.Tensor]], groups: list[dict],
                 names_per_group: list[list[str]], optimizer: torch.optim.Optimizer, **kwargs) -> Ownership:
    """The ownership of an engine whose optimizer steps the parameters themselves (DDP: whole
    tensors; FSDP2: local dim-0 shards, `ranges_of` in kwargs): one store per parameter."""
    ranges_of = kwargs.pop("ranges_of", lambda index, p: (OwnedRange(0, p.numel(), index, 0),))
    group_of = {n: g for g, names in enumerate(names_per_group) for n in names}
    params = {name: OwnedParam(tuple(p.shape), memory_dim_order(local_tensor(p.detach()), name), group_of[name],
                               tuple(ranges_of(i, p))) for i, (name, p) in enumerate(named)}
    tensors = [p for _, p in named]

    def fresh_state(i):
        optimizer.state[tensors[i]] = {}
        return optimizer.state[tensors[i]]

    return Ownership(params=params, stores=[local_tensor(p.detach()) for p in tensors],
                     state_of=lambda i: optimizer.state.get(tensors[i], {}), fresh_state=fresh_state, groups=groups,
                     names_per_group=names_per_group, publish=lambda: None,
                     state_like=lambda i: tensors[i].detach(), **kwargs)
