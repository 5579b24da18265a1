"""An engine's pieces in checkpoint files and back, at any world size and engine.

The engine answers one question, `Engine.ownership()`: which elements of each parameter
this rank holds, in which of its stores and at which offset, and where their optimizer state
lives. This module does the rest, per `Ownership.layout` (the payload each layout writes is
the checkpoint format, see `vsgd_dist.train.checkpoint`):

- `payload(engine)`: what this rank writes;
- `load(engine, read, meta, optimizer_class)`: load a checkpoint of any engine and world
  size: shard by shard when it has this run's exact layout, else through the full form;
- `full_state(read, meta)`: the world-size-free full form (`vsgd_dist.full_form`) of a
  checkpoint, assembled from every rank's file; needs no process group;
- `grad_state_payload` / `grad_state_full` / `load_grad_state`: gradient transforms'
  per-element state (laid out like `Engine.reduced_grads()`) the same way.

`read(rank)` gives that rank's engine payload, `meta` the checkpoint's meta.json.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from vsgd_dist.distributed import local_tensor
from vsgd_dist.engines import Engine, engine_class
from vsgd_dist.engines.ownership import Ownership, flat
from vsgd_dist.engines.sampling import WeightSampling
from vsgd_dist.full_form import (FORMAT, CheckpointMismatch, assemble, by_name, check_optimizer, groups_in_order,
                                 hyperparameters, torch_state_dict)
from vsgd_dist.registry import class_path
from vsgd_dist.sharding import consolidate, shard_from_full
from vsgd_dist.sharding.layout import from_memory_flat, to_memory_flat

Read = Callable[[int], dict]


# ---- what a rank writes ---------------------------------------------------------------------
def payload(engine: Engine) -> dict:
    """What this rank writes into its checkpoint file (tensors and plain values); the weights
    saved are the mean weights (a sampling step defers their gather)."""
    WeightSampling(engine).mean_weights()
    own = engine.ownership()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if own.layout == "replicated":  # rank 0's file holds everything; the others stay small
        return {"model": engine.model.state_dict(), "optimizer": engine.optimizer.state_dict()} if own.writes else {}
    if own.layout == "rows":  # this rank's rows of every sharded tensor, with where they sit
        if not own.writes:
            return {}
        model = engine.model.state_dict()
        optimizer, groups = by_name(engine.optimizer.state_dict())
        return {"model": {k: local_tensor(v) for k, v in model.items()},
                "rows": {k: list(_rows(own, k)) for k, v in model.items() if isinstance(v, DTensor)},
                "optimizer": {name: {k: local_tensor(v) for k, v in s.items()} for name, s in optimizer.items()},
                "param_groups": groups}
    if own.layout == "flat_shards":  # this rank's shard + its layout; rank 0 adds the model
        state = {"optimizer": engine.optimizer.state_dict()} if own.writes else {}
        if rank == 0:
            state["model"] = engine.model.state_dict()
        return state
    if own.layout == "partitions":  # fp32 partitions (plain tensors) and each parameter's fragment
        state = {"fp32_partitions": [t.detach() for t in own.stores], "optimizer": engine.optimizer.state_dict(),
                 "global_steps": engine.global_steps, "param_names": own.names_per_group,
                 "fragments": _fragments(own)}
        if rank == 0:
            state["model"] = engine.model.state_dict()
        return state
    raise ValueError(f"unknown ownership layout {own.layout!r}")


def grad_state_payload(engine: Engine, state: dict[str, list[torch.Tensor]]) -> dict:
    """What this rank writes of per-element tensors laid out like `reduced_grads()` ({key:
    tensors})."""
    own = engine.ownership()
    if not own.writes:
        return {}
    if own.layout == "replicated":
        names = list(own.params)
        return {key: dict(zip(names, tensors)) for key, tensors in state.items()}
    if own.layout == "rows":
        names = list(own.params)
        return {"rows": {name: list(_rows(own, name)) for name in names},
                "tensors": {key: dict(zip(names, tensors)) for key, tensors in state.items()}}
    if own.layout == "flat_shards":  # where they lie is in the optimizer layout
        return dict(state)
    raise NotImplementedError(f"gradient-transform state is not saved from layout {own.layout!r}")


# ---- loading ---------------------------------------------------------------------------------
def load(engine: Engine, read: Read, meta: dict, optimizer_class: type) -> None:
    """Load from a checkpoint. A checkpoint of this layout and shard count loads shard by
    shard; any other (another world size or engine) is consolidated by every rank, which then
    keeps its part (mmap'd reads: only the pages touched are read)."""
    check_optimizer(meta, class_path(optimizer_class))
    own = engine.ownership()
    if not _load_own_shard(engine, own, read, meta):
        load_full_state(engine, full_state(read, meta))


def _load_own_shard(engine: Engine, own: Ownership, read: Read, meta: dict) -> bool:
    """Load this rank's shard when the checkpoint has this run's exact layout; return whether
    it did."""
    if engine_class(meta["engine"]).layout != own.layout:
        return False
    if own.layout == "flat_shards":
        # the shard of this rank in the shard group, when the checkpoint was cut into as many
        # shards (e.g. 2 ranks, or 2 nodes x 2 with shard_within=node, for 2 ranks per group)
        opt = engine.optimizer
        if _shard_count(read) != opt.world_size:
            return False
        saved = read(opt.rank)["optimizer"]
        layout = opt.layout()
        if any(saved[key] != layout[key] for key in layout):  # other parameters or bucket_mb
            return False
        _load_model(engine, read(0)["model"])
        opt.load_state_dict(saved)
        return True
    if own.layout == "partitions":
        world = dist.get_world_size() if dist.is_initialized() else 1
        if meta["world_size"] != world:
            return False
        state = read(dist.get_rank() if dist.is_initialized() else 0)
        if state["fragments"] != _fragments(own) or [t.shape for t in state["fp32_partitions"]] != \
                [t.shape for t in own.stores]:
            return False  # other bucket sizes or parameters: go through the full form
        _load_model(engine, read(0)["model"])
        for current, value in zip(own.stores, state["fp32_partitions"]):
            current.data.copy_(value)
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.global_steps = state["global_steps"]
        return True
    return False


def load_full_state(engine: Engine, full: dict) -> None:
    """Load the full per-parameter form, keeping this rank's part."""
    own = engine.ownership()
    names = own.names_per_group
    if own.layout == "replicated":
        _load_model(engine, full["model"])
        engine.optimizer.load_state_dict(torch_state_dict(full, names))
    elif own.layout == "rows":  # this rank's rows of the full tensors (FSDP2's dim-0 split)
        _check_model(engine, full["model"])
        mine = engine.model.state_dict()
        with torch.no_grad():
            for name, tensor in mine.items():
                value = full["model"][name]
                if isinstance(tensor, DTensor):
                    start, stop = _rows(own, name)
                    value = value[start:stop]
                local_tensor(tensor).copy_(value)

        def place(name, value):
            param = mine[name]
            if not isinstance(param, DTensor):
                return value
            start, stop = _rows(own, name)
            return DTensor.from_local(value[start:stop].contiguous(), param.device_mesh, param.placements,
                                      shape=param.shape, stride=param.stride())

        engine.optimizer.load_state_dict(torch_state_dict(full, names, place))
    elif own.layout == "flat_shards":  # masters from the full form's fp32 masters, else the weights
        _load_model(engine, full["model"])
        groups = groups_in_order(full, names)
        per_param = {}
        for name in (n for group in names for n in group):
            master = full["master"].get(name, full["model"][name]).float()
            per_param[name] = {**full["optimizer"].get(name, {}), "master": master}
        engine.optimizer.load_state_dict(shard_from_full(per_param, engine.optimizer, groups))
    elif own.layout == "partitions":  # fragment by fragment; any per-element state key moves
        _load_model(engine, full["model"])
        groups = groups_in_order(full, names)
        fragments = _fragments(own)
        for index, (group_names, saved, partition) in enumerate(zip(names, groups, own.stores)):
            mine = [(name, fragments[name]) for name in group_names if name in fragments]
            master = full["master"]
            partition.data.copy_(_partition(partition, mine, lambda n: master.get(n, full["model"][n]).float()))
            states = [full["optimizer"][n] for n in group_names if full["optimizer"].get(n)]
            state = {}
            for key, value in (states[0].items() if states else ()):
                if torch.is_tensor(value) and value.dim() > 0:  # per element; counters are 0-d
                    state[key] = _partition(partition, mine, lambda n: full["optimizer"][n][key]).to(value.dtype)
                else:
                    state[key] = value.clone() if torch.is_tensor(value) else value
            engine.optimizer.state[partition] = state
            engine.optimizer.param_groups[index].update(hyperparameters(saved))  # initial_lr included
        engine.global_steps = full["step"]
    else:
        raise ValueError(f"unknown ownership layout {own.layout!r}")


def load_grad_state(engine: Engine, read: Read, meta: dict) -> dict[str, list[torch.Tensor]]:
    """The per-element gradient-layout state of a checkpoint written by any engine at any
    world size, as this rank lays it out."""
    return grad_state_from_full(engine.ownership(), grad_state_full(read, meta))


def grad_state_from_full(own: Ownership, full: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """This rank's part of full per-parameter tensors, laid out like its stores (what it
    does not hold, such as bucket padding, is zero)."""
    out = {}
    for key, by_name in full.items():
        dtype = next(iter(by_name.values())).dtype
        stores = [torch.zeros_like(s, dtype=dtype) for s in own.stores]
        for name, param in own.params.items():
            elements = None
            for r in param.ranges:
                if r.start == r.stop:
                    continue
                if elements is None:
                    elements = to_memory_flat(by_name[name].to(stores[r.store].device), param.dim_order)
                flat(stores[r.store])[r.offset:r.offset + r.stop - r.start] = elements[r.start:r.stop]
        out[key] = stores
    return out


# ---- the full form of a checkpoint -------------------------------------------------------------
def full_state(read: Read, meta: dict) -> dict:
    """The full form of a checkpoint, whichever engine wrote it. Needs no process group."""
    layout = engine_class(meta["engine"]).layout
    parts = {"replicated": _replicated_parts, "rows": _rows_parts, "flat_shards": _flat_shards_parts,
             "partitions": _partitions_parts}[layout](read, meta)
    return {"format": FORMAT, "step": meta["step"], "optimizer_class": meta["optimizer_class"], "master": {},
            **parts}


def grad_state_full(read: Read, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{key: {param name: full tensor}} from every rank's `grad_state_payload`."""
    layout = engine_class(meta["engine"]).layout
    if layout == "replicated":
        return {key: dict(by_name) for key, by_name in read(0)["grad_state"].items()}
    if layout == "rows":
        files = [f["grad_state"] for f in _row_files(read, meta)]
        full = {}
        for key, by_name in files[0]["tensors"].items():
            full[key] = {}
            for name in by_name:
                pieces = sorted(((f["rows"][name][0], f["tensors"][key][name]) for f in files
                                 if f["rows"][name][1] > f["rows"][name][0]), key=lambda piece: piece[0])
                full[key][name] = torch.cat([piece for _, piece in pieces])
        return full
    if layout == "flat_shards":  # each parameter put together from every shard's owned part of it
        files = [read(rank) for rank in range(_shard_count(read))]
        full = {key: {} for key in files[0]["grad_state"]}
        for name, param in files[0]["optimizer"]["params"].items():
            start, end = param["range"]
            for key, by_name in full.items():
                flat_param = None
                for f in files:
                    part = f["optimizer"]["params"][name]
                    lo, hi = part["owned"]
                    if lo == hi:
                        continue
                    source = f["grad_state"][key][part["bucket"]]
                    offset = lo - f["optimizer"]["buckets"][part["bucket"]]["owned"][0]
                    if flat_param is None:
                        flat_param = source.new_zeros(end - start)
                    flat_param[lo - start:hi - start] = source[offset:offset + hi - lo]
                by_name[name] = from_memory_flat(flat_param, tuple(param["shape"]),
                                                 tuple(param["dim_order"])).contiguous()
        return full
    raise NotImplementedError(f"gradient-transform state is not read from layout {layout!r}")


def _replicated_parts(read: Read, meta: dict) -> dict:
    """Rank 0's file already holds everything, keyed by parameter index: key it by name."""
    saved = read(0)
    optimizer, groups = by_name(saved["optimizer"])
    return {"model": saved["model"], "optimizer": optimizer, "param_groups": groups}


def _rows_parts(read: Read, meta: dict) -> dict:
    """Concatenate every rank's rows of each sharded tensor; unsharded ones come from rank 0."""
    files = _row_files(read, meta)

    def full(name, pick):
        pieces = [(f["rows"][name][0], pick(f)) for f in files if f["rows"][name][1] > f["rows"][name][0]]
        return torch.cat([piece for _, piece in sorted(pieces, key=lambda p: p[0])])

    def sharded(name, value):  # per-element state is laid out like its parameter
        return name in first["rows"] and torch.is_tensor(value) and value.dim() > 0

    first = files[0]
    model = {name: full(name, lambda f: f["model"][name]) if name in first["rows"] else value
             for name, value in first["model"].items()}
    optimizer = {name: {key: full(name, lambda f: f["optimizer"][name][key]) if sharded(name, value) else value
                        for key, value in state.items()}
                 for name, state in first["optimizer"].items()}
    return {"model": model, "optimizer": optimizer, "param_groups": first["param_groups"]}


def _flat_shards_parts(read: Read, meta: dict) -> dict:
    """Every ZeRO shard consolidated."""
    model = read(0)["model"]
    shards = [read(rank)["optimizer"] for rank in range(_shard_count(read))]
    optimizer, master = {}, {}
    for name, state in consolidate(shards).items():
        fp32 = state.pop("master")
        if model[name].dtype != fp32.dtype:  # bf16 weights: the master holds the precision
            master[name] = fp32
        optimizer[name] = state
    groups = [{**hyperparameters(g), "param_names": g["param_names"]} for g in shards[0]["param_groups"]]
    return {"model": model, "master": master, "optimizer": optimizer, "param_groups": groups}


def _partitions_parts(read: Read, meta: dict) -> dict:
    """Each parameter reassembled from its fragments in every rank's flat partitions."""
    files = [read(rank) for rank in range(meta["world_size"])]
    model = files[0]["model"]
    saved_groups = files[0]["optimizer"]["param_groups"]
    master, optimizer, groups = {}, {}, []
    for index, names in enumerate(files[0]["param_names"]):
        groups.append({**hyperparameters(saved_groups[index]), "param_names": names})
        group_state = files[0]["optimizer"]["state"].get(saved_groups[index]["params"][0], {})
        for name in names:
            numel, shape = model[name].numel(), model[name].shape

            def gather(partition_of):
                pieces = [(f["fragments"][name][1], partition_of(f), f["fragments"][name][2],
                           f["fragments"][name][3]) for f in files if name in f["fragments"]]
                return assemble(numel, pieces, partition_of(files[0])).view(shape)

            fp32 = gather(lambda f: f["fp32_partitions"][index])
            if model[name].dtype != fp32.dtype:
                master[name] = fp32
            optimizer[name] = {
                key: gather(lambda f: f["optimizer"]["state"][saved_groups[index]["params"][0]][key])
                if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in group_state.items()}
    return {"model": model, "master": master, "optimizer": optimizer, "param_groups": groups}


# ---- helpers -----------------------------------------------------------------------------------
def _rows(own: Ownership, name: str) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 of parameter `name` this rank holds (layout "rows")."""
    param = own.params[name]
    (r,) = param.ranges
    row = 1
    for size in param.shape[1:]:
        row *= size
    return r.start // row, r.stop // row


def _fragments(own: Ownership) -> dict[str, list[int]]:
    """name -> [group, first element in the parameter, first element in this rank's
    partition, element count] (layout "partitions"; the checkpoint's "fragments")."""
    return {name: [r.store, r.start, r.offset, r.stop - r.start]
            for name, param in own.params.items() for r in param.ranges}


def _partition(like: torch.Tensor, fragments: list, full_of) -> torch.Tensor:
    """A flat partition shaped like `like` holding each named fragment of `full_of(name)`."""
    partition = torch.zeros_like(like)
    for name, (_, param_start, start, count) in fragments:
        partition[start:start + count] = full_of(name).reshape(-1)[param_start:param_start + count]
    return partition


def _row_files(read: Read, meta: dict) -> list[dict]:
    """The engine payloads of a checkpoint's ranks that wrote rows (all, or the first node's)."""
    return [f for f in (read(rank) for rank in range(meta["world_size"])) if f.get("rows") is not None]


def _shard_count(read: Read) -> int:
    """How many shards a ZeRO checkpoint holds: one per rank of its shard group (the world,
    or a node), written by ranks 0 .. count - 1."""
    return read(0)["optimizer"]["world_size"]


def _load_model(engine: Engine, state: dict) -> None:
    """Load model weights, naming what differs instead of torch's long error."""
    _check_model(engine, state)
    engine.model.load_state_dict(state)


def _check_model(engine: Engine, state: dict) -> None:
    mine = engine.model.state_dict()
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    if missing or unexpected:
        raise CheckpointMismatch(f"checkpoint is of another model: missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]}; use another out= folder")
    for name, value in state.items():
        if tuple(value.shape) != tuple(mine[name].shape):
            raise CheckpointMismatch(f"checkpoint is of another model: {name} has shape {tuple(value.shape)} "
                                     f"there, {tuple(mine[name].shape)} here; use another out= folder")
