"""An engine's pieces as a torch.distributed.checkpoint (DCP) state dict, and back.

The engine answers one question, `Engine.ownership()`: which elements of each parameter this
rank holds, in which of its stores and at which offset. Every parameter is written as 1-D
global tensors of `numel` elements in its memory order, whose chunks are the ranks'
`OwnedRange`s (ZeRO buckets cut parameters mid-tensor: only 1-D chunks express every engine):

    master/<param>             fp32 weights
    optim/<param>/<key>        per-element optimizer state (VSGD's mug/bg/bhg, AdamW's exp_avg...)
    grad/<key>/<param>         gradient transforms' per-element state (alpha-SVRG's snapshot)
    counters/<param>           {key: value} of its non-per-element optimizer state (`step`)
    model/<buffer>             buffers, whole (DCP keeps one copy)
    param_groups               hyperparameters and parameter names per group
    trainer/rank<r>            each rank's trainer state (data position, RNG, ...)

DCP matches the chunks a rank asks for against the chunks written, so any engine at any
world size loads any checkpoint, each rank reading only what overlaps its own elements.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

from vsgd_dist.engines import Engine
from vsgd_dist.engines.ownership import Ownership, flat
from vsgd_dist.engines.sampling import WeightSampling
from vsgd_dist.sharding.layout import from_memory_flat, to_memory_flat


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not fit this model or optimizer."""


class OwnedChunks:
    """One parameter's 1-D global tensor of `numel` elements as the chunks this rank holds:
    written from them on save, filled in place on load (DCP's checkpointable protocol)."""

    def __init__(self, numel: int, chunks: list[tuple[int, torch.Tensor]]):
        self.numel = numel
        self.chunks = {start: t for start, t in chunks if t.numel()}

    def size(self) -> torch.Size:
        return torch.Size([self.numel])

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size([start])), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(t),
                                                      size=self.size()))
                for (start, t), chunk in zip(self.chunks.items(), self.__create_chunk_list__())]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size([start]), sizes=torch.Size([t.numel()]))
                for start, t in self.chunks.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.chunks[index.offset[0]]


# ---- save -------------------------------------------------------------------------------------
def save_state(engine: Engine, grad_state: dict[str, list[torch.Tensor]] | None, trainer: dict) -> dict:
    """This rank's DCP state dict (views of the live tensors: stage a copy to save in the
    background); the weights are the mean weights (a sampling step defers their gather)."""
    WeightSampling(engine).mean_weights()
    own = engine.ownership()
    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict = {f"model/{k}": v for k, v in engine.model.state_dict().items() if k not in own.params}
    state["param_groups"] = [{**_hyperparameters(g), "param_names": list(names)}
                             for g, names in zip(own.groups, own.names_per_group)]
    state[f"trainer/rank{rank}"] = trainer
    for name, param in own.params.items():
        ranges = [r for r in param.ranges if r.stop > r.start] if own.writes else []
        numel = _numel(param.shape)

        def owned(tensor_of):
            return OwnedChunks(numel, [(r.start, flat(tensor_of(r.store))[r.offset:r.offset + r.stop - r.start])
                                       for r in ranges])

        state[f"master/{name}"] = owned(lambda i: own.stores[i])
        if ranges:
            saved = own.state_of(ranges[0].store)
            for key, value in saved.items():
                if not _per_element(value, own.stores[ranges[0].store]):
                    state.setdefault(f"counters/{name}", {})[key] = value.clone() if torch.is_tensor(value) else value
            for key in [k for k, v in saved.items() if _per_element(v, own.stores[ranges[0].store])]:
                state[f"optim/{name}/{key}"] = owned(lambda i: own.state_of(i)[key])
        for key, tensors in (grad_state or {}).items():
            state[f"grad/{key}/{name}"] = owned(lambda i: tensors[i])
    return state


def local_tensors(state: dict) -> list[torch.Tensor]:
    """The tensors this rank writes of a `save_state` dict."""
    out = []
    for value in state.values():
        if isinstance(value, OwnedChunks):
            out.extend(value.chunks.values())
        elif torch.is_tensor(value):
            out.append(value)
    return out


# ---- load -------------------------------------------------------------------------------------
def check_model(engine: Engine, params: dict[str, dict], metadata: Metadata) -> None:
    """CheckpointMismatch naming what differs between this model and the checkpoint's
    (`params`: meta.json's, see `params_of`)."""
    own = engine.ownership()
    mine = {k: tuple(v.shape) for k, v in engine.model.state_dict().items()}
    saved = {**{k: tuple(p["shape"]) for k, p in params.items()},
             **{k[len("model/"):]: tuple(md.size) for k, md in metadata.state_dict_metadata.items()
                if k.startswith("model/") and isinstance(md, TensorStorageMetadata)}}
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or unexpected:
        raise CheckpointMismatch(f"checkpoint is of another model: missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]}; use another out= folder")
    for name, shape in saved.items():
        if shape != mine[name]:
            raise CheckpointMismatch(f"checkpoint is of another model: {name} has shape {shape} there, "
                                     f"{mine[name]} here; use another out= folder")
    if set(own.params) - set(params):
        raise CheckpointMismatch(f"checkpoint holds {sorted(set(own.params) - set(params))[:3]} as buffers, "
                                 f"this model as parameters; use another out= folder")


def load_state(engine: Engine, metadata: Metadata, params: dict[str, dict], trainer_key: str, load) -> dict:
    """Load a checkpoint into `engine` through `load(state_dict)` (dcp.load with this run's
    reader and planner), this rank asking only for its own chunks. A parameter the checkpoint
    counts in another memory order (`params`, see `params_of`: e.g. channels_last under DDP,
    contiguous under FSDP2) is read whole and reordered. Returns {"trainer": the state under
    `trainer_key`, "grad_state": {key: tensors laid out like the stores}}."""
    own = engine.ownership()
    reordered = {name for name, p in own.params.items() if tuple(params[name]["dim_order"]) != p.dim_order}
    after_load = []  # (whole tensor in the checkpoint's order, name, destination chunks)
    saved = metadata.state_dict_metadata
    model = engine.model.state_dict()
    state: dict = {k: v for k, v in ((f"model/{k}", v) for k, v in model.items() if k not in own.params)}
    state["param_groups"], state[trainer_key] = None, None
    whole: dict[str, torch.Tensor] = {}  # params every rank holds whole: the full weights
    stores_of: dict[int, list[str]] = {}
    for name, param in own.params.items():
        for r in param.ranges:
            stores_of.setdefault(r.store, []).append(name)
        if f"counters/{name}" in saved:
            state[f"counters/{name}"] = None
        if not isinstance(model[name], DTensor):
            whole[name] = torch.empty(_numel(param.shape), dtype=torch.float32, device=own.stores[0].device)
            state[f"master/{name}"] = OwnedChunks(whole[name].numel(), [(0, whole[name])])
    fresh: dict[int, dict] = {}

    def into(tensors_of, name, dtype=torch.float32):
        param = own.params[name]
        chunks = [(r.start, flat(tensors_of(r.store))[r.offset:r.offset + r.stop - r.start])
                  for r in param.ranges if r.stop > r.start]
        if name not in reordered:
            return OwnedChunks(_numel(param.shape), chunks)
        whole_saved = torch.empty(_numel(param.shape), dtype=dtype, device=own.stores[0].device)
        after_load.append((whole_saved, name, chunks))
        return OwnedChunks(whole_saved.numel(), [(0, whole_saved)])

    for name in own.params:
        if name not in whole:
            state[f"master/{name}"] = into(lambda i: own.stores[i], name)
    grad_state: dict[str, list[torch.Tensor]] = {}
    for fqn, md in saved.items():
        kind, _, rest = fqn.partition("/")
        if kind == "optim":
            name, key = rest.rsplit("/", 1)
            for store in {r.store for r in own.params[name].ranges}:
                if store not in fresh:
                    fresh[store] = own.fresh_state(store)
                if key not in fresh[store]:
                    fresh[store][key] = torch.zeros_like(own.state_like(store), dtype=md.properties.dtype)
            state[fqn] = into(lambda i: fresh[i][key], name, md.properties.dtype)
        elif kind == "grad":
            key, name = rest.rsplit("/", 1)
            if key not in grad_state:
                grad_state[key] = [torch.zeros_like(s, dtype=md.properties.dtype) for s in own.stores]
            state[fqn] = into(lambda i: grad_state[key][i], name, md.properties.dtype)
    load(state)
    with torch.no_grad():
        for saved_order, name, chunks in after_load:
            mine = to_memory_flat(from_memory_flat(saved_order, own.params[name].shape,
                                                   tuple(params[name]["dim_order"])), own.params[name].dim_order)
            for start, destination in chunks:
                destination.copy_(mine[start:start + destination.numel()])
        for name, weights in whole.items():
            param = own.params[name]
            if name in reordered:
                weights = from_memory_flat(weights, param.shape, tuple(params[name]["dim_order"]))
                model[name].copy_(weights)
                weights = to_memory_flat(weights, param.dim_order)
            else:
                model[name].copy_(from_memory_flat(weights, param.shape, param.dim_order))
            for r in param.ranges:
                flat(own.stores[r.store])[r.offset:r.offset + r.stop - r.start] = weights[r.start:r.stop]
    for store, names in stores_of.items():  # counters: a store's are any of its parameters'
        counters = next((state[f"counters/{n}"] for n in names if state.get(f"counters/{n}") is not None), None)
        if counters:
            if store not in fresh:
                fresh[store] = own.fresh_state(store)
            fresh[store].update(counters)
    for group, saved_group in zip(own.groups, groups_in_order(state["param_groups"], own.names_per_group)):
        group.update(_hyperparameters(saved_group))
    return {"trainer": state[trainer_key], "grad_state": grad_state}


def groups_in_order(saved_groups: list[dict], names_per_group: list[list[str]]) -> list[dict]:
    """The saved param groups in this optimizer's order, or CheckpointMismatch naming what differs."""
    saved = {tuple(g["param_names"]): g for g in saved_groups}
    ordered = []
    for names in names_per_group:
        group = saved.get(tuple(names))
        if group is None:
            have = sorted({n for g in saved_groups for n in g["param_names"]})
            missing = sorted(set(names) - set(have))
            raise CheckpointMismatch(f"checkpoint's optimizer groups differ from this run's: missing {missing[:3]}, "
                                     f"unexpected {sorted(set(have) - {n for g in names_per_group for n in g})[:3]}"
                                     f" (other model or weight-decay grouping); use another out= folder")
        ordered.append(group)
    return ordered


def params_of(own: Ownership) -> dict[str, dict]:
    """{name: {"shape", "dim_order"}}: what turns a parameter's 1-D tensors back into its shape."""
    return {name: {"shape": list(p.shape), "dim_order": list(p.dim_order)} for name, p in own.params.items()}


def full_form(values: dict, params: dict[str, dict]) -> dict:
    """A whole checkpoint's values ({fqn: value}, read in one process) per parameter:
    {"model": {name: tensor}, "optimizer": {param: {key: tensor or counter}}, "param_groups",
    "grad_state": {key: {param: tensor}}, "trainer": {rank: state}}; weights are the fp32 masters."""
    def shaped(name, flat_tensor):
        return from_memory_flat(flat_tensor, tuple(params[name]["shape"]),
                                tuple(params[name]["dim_order"])).contiguous()

    full = {"model": {}, "optimizer": {}, "param_groups": values["param_groups"], "grad_state": {}, "trainer": {}}
    for fqn, value in sorted(values.items()):
        kind, _, rest = fqn.partition("/")
        if kind == "model":
            full["model"][rest] = value
        elif kind == "master":
            full["model"][rest] = shaped(rest, value)
        elif kind == "optim":
            name, key = rest.rsplit("/", 1)
            full["optimizer"].setdefault(name, {})[key] = shaped(name, value)
        elif kind == "counters":
            full["optimizer"].setdefault(rest, {}).update(value)
        elif kind == "grad":
            key, name = rest.rsplit("/", 1)
            full["grad_state"].setdefault(key, {})[name] = shaped(name, value)
        elif kind == "trainer":
            full["trainer"][int(rest.removeprefix("rank"))] = value
    return full


def _hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def _per_element(value, store: torch.Tensor) -> bool:
    """A state tensor with one entry per element of its store, as opposed to a counter."""
    return torch.is_tensor(value) and value.dim() > 0 and flat(value).numel() == flat(store).numel()


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
