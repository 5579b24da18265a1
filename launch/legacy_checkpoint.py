"""The per-rank checkpoint format this trainer wrote before DCP, read offline for
`python -m launch checkpoint upgrade` (no process group): every rank's `rank<r>.pt` assembled
into the full per-parameter form, whichever engine wrote it:

    {"step", "model": {name: tensor}, "master": {param: fp32 tensor} (bf16 weights only),
     "optimizer": {param: {state key: tensor in the parameter's shape, or a counter}},
     "param_groups": [{hyperparameter: value, "param_names": [...]}], "optimizer_class"}

`read(rank)` gives that rank's engine payload, `meta` the checkpoint's meta.json. This module
can go once no checkpoint of the old format is left to upgrade.
"""
from __future__ import annotations

from typing import Callable

import torch

from vsgd_dist.sharding import consolidate
from vsgd_dist.sharding.layout import from_memory_flat

Read = Callable[[int], dict]
LAYOUT_OF_ENGINE = {"ddp": "replicated", "fsdp2": "rows", "zero": "flat_shards", "deepspeed": "partitions"}


def hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def by_name(state_dict: dict) -> tuple[dict[str, dict], list[dict]]:
    """A torch optimizer state_dict (state keyed by index) as (state by parameter name,
    param_groups with names instead of indices)."""
    state, groups = {}, []
    for group in state_dict["param_groups"]:
        for index, name in zip(group["params"], group["param_names"]):
            if index in state_dict["state"]:
                state[name] = state_dict["state"][index]
        groups.append({**hyperparameters(group), "param_names": list(group["param_names"])})
    return state, groups


def assemble(numel: int, pieces: list[tuple[int, torch.Tensor, int, int]], like: torch.Tensor) -> torch.Tensor:
    """A flat tensor of `numel` elements from `(start, source, source_start, count)` pieces."""
    flat = like.new_zeros(numel)
    for start, source, source_start, count in pieces:
        flat[start:start + count] = source[source_start:source_start + count]
    return flat


def full_state(read: Read, meta: dict) -> dict:
    """The full form of a checkpoint, whichever engine wrote it. Needs no process group."""
    layout = LAYOUT_OF_ENGINE[meta["engine"]]
    parts = {"replicated": _replicated_parts, "rows": _rows_parts, "flat_shards": _flat_shards_parts,
             "partitions": _partitions_parts}[layout](read, meta)
    return {"step": meta["step"], "optimizer_class": meta["optimizer_class"], "master": {}, **parts}


def grad_state_full(read: Read, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{key: {param name: full tensor}} from every rank's `grad_state_payload`."""
    layout = LAYOUT_OF_ENGINE[meta["engine"]]
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


def _row_files(read: Read, meta: dict) -> list[dict]:
    """The engine payloads of a checkpoint's ranks that wrote rows (all, or the first node's)."""
    return [f for f in (read(rank) for rank in range(meta["world_size"])) if f.get("rows") is not None]


def _shard_count(read: Read) -> int:
    """How many shards a ZeRO checkpoint holds: one per rank of its shard group (the world,
    or a node), written by ranks 0 .. count - 1."""
    return read(0)["optimizer"]["world_size"]


def open_legacy(path) -> tuple[dict, Read]:
    """(meta.json, read) of an old-format checkpoint folder: `read(rank)` checks that rank's
    file against meta.json's checksum, then loads it with weights_only=True."""
    import hashlib
    import json
    import pickle
    from pathlib import Path

    from vsgd_dist.train.checkpoint import CheckpointError

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())

    def read(rank: int) -> dict:
        file = path / f"rank{rank}.pt"
        if not file.is_file():
            raise CheckpointError(f"{path} lacks {file.name} of its {meta['world_size']} rank files; copy it again")
        expected = meta.get("sha256", {}).get(file.name)
        with open(file, "rb") as f:
            if expected is not None and hashlib.file_digest(f, "sha256").hexdigest() != expected:
                raise CheckpointError(f"{file} does not match the checksum meta.json recorded at save; "
                                      f"it changed on disk or in a copy")
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{file} holds objects other than tensors and containers "
                                  f"({str(e).splitlines()[-1].strip()}); it was not written by this trainer or "
                                  f"was tampered with") from None

    return meta, read


def upgraded_state(meta: dict, read: Read) -> tuple[dict, dict]:
    """(DCP state dict, meta.json fields) of an old-format checkpoint in the new format: each
    parameter 1-D in its contiguous order (the loaders reorder to their own)."""
    full = full_state(lambda rank: read(rank)["engine"], meta)
    names = [n for g in full["param_groups"] for n in g["param_names"]]
    state, params = {"param_groups": full["param_groups"]}, {}
    for name, tensor in full["model"].items():
        if name not in names:
            state[f"model/{name}"] = tensor
            continue
        params[name] = {"shape": list(tensor.shape), "dim_order": list(range(tensor.dim()))}
        state[f"master/{name}"] = full["master"].get(name, tensor).float().contiguous().view(-1)
        for key, value in full["optimizer"].get(name, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == tensor.shape:
                state[f"optim/{name}/{key}"] = value.contiguous().view(-1)
            else:
                state.setdefault(f"counters/{name}", {})[key] = value
    for key, by_name in (grad_state_full(lambda rank: read(rank)["engine"], meta) if meta.get("grad_state")
                         else {}).items():
        for name, value in by_name.items():
            state[f"grad/{key}/{name}"] = value.contiguous().view(-1)
    writers = meta["world_size"]
    for rank in range(writers):
        state[f"trainer/rank{rank}"] = read(rank)["trainer"]
    return state, {"params": params, "grad_state": sorted(meta.get("grad_state", []))}
