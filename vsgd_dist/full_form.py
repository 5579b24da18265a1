"""The full per-parameter form of a checkpoint: every engine converts its shards to it and back.

    {"format": FORMAT, "step": int,
     "model": {name: full tensor}                       model.state_dict(): weights and buffers
     "master": {param name: fp32 tensor}                only where fp32 masters carry more
                                                        precision than the weights (bf16 weights)
     "optimizer": {param name: {state key: tensor in the parameter's shape, or a counter}}
     "param_groups": [{hyperparameter: value, "param_names": [...]}]
     "optimizer_class": "vsgd_dist.optim.vsgd.VSGD"}

Nothing in it depends on the world size or the engine that wrote it, so a checkpoint written
by any engine at N ranks loads into any engine at M ranks: `vsgd_dist.train.engine_state`
assembles it from the writing engine's files and cuts out the loading engine's part.
Optimizer state keys are never interpreted: whatever per-element tensors the optimizer keeps
(VSGD's mug/bg/bhg, AdamW's exp_avg/exp_avg_sq) are moved as they are.

This module sits below the engines and the sharding code and imports neither.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

FORMAT = "vsgd_dist.full/1"


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not fit this model, optimizer or world size."""


def is_per_element(value: Any, shape: torch.Size | tuple) -> bool:
    """A state tensor with one entry per element of a tensor of `shape` (a parameter, or a
    flat shard), as opposed to a counter such as `step`."""
    return torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(shape)


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


def groups_in_order(full: dict, names_per_group: list[list[str]]) -> list[dict]:
    """The saved param groups in this optimizer's order, or CheckpointMismatch naming what differs."""
    saved = {tuple(g["param_names"]): g for g in full["param_groups"]}
    ordered = []
    for names in names_per_group:
        group = saved.get(tuple(names))
        if group is None:
            have = sorted({n for g in full["param_groups"] for n in g["param_names"]})
            missing = sorted(set(names) - set(have))
            raise CheckpointMismatch(f"checkpoint's optimizer groups differ from this run's: missing {missing[:3]}, "
                                     f"unexpected {sorted(set(have) - {n for g in names_per_group for n in g})[:3]}"
                                     f" (other model or weight-decay grouping); use another out= folder")
        ordered.append(group)
    return ordered


def check_optimizer(full_or_meta: dict, optimizer_class: str) -> None:
    saved = full_or_meta["optimizer_class"]
    if saved != optimizer_class:
        raise CheckpointMismatch(f"checkpoint holds {saved} state, this run's optimizer is {optimizer_class}; "
                                 f"resume with the optimizer it was written with or use another out= folder")


def torch_state_dict(full: dict, names_per_group: list[list[str]],
                     place: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, value: value) -> dict:
    """A torch optimizer state_dict for groups holding `names_per_group`, from the full form;
    `place(param name, per-element tensor)` lays a tensor out like its parameter (e.g. as a
    DTensor shard)."""
    groups = groups_in_order(full, names_per_group)
    state, index = {}, 0
    out_groups = []
    for names, saved in zip(names_per_group, groups):
        out_groups.append({**hyperparameters(saved), "params": list(range(index, index + len(names))),
                           "param_names": list(names)})
        for name in names:
            if full["optimizer"].get(name):
                shape = full["model"][name].shape
                state[index] = {k: place(name, v.clone()) if is_per_element(v, shape) else v
                                for k, v in full["optimizer"][name].items()}
            index += 1
    return {"state": state, "param_groups": out_groups}


def assemble(numel: int, pieces: list[tuple[int, torch.Tensor, int, int]], like: torch.Tensor) -> torch.Tensor:
    """A flat tensor of `numel` elements from `(start, source, source_start, count)` pieces."""
    flat = like.new_zeros(numel)
    for start, source, source_start, count in pieces:
        flat[start:start + count] = source[source_start:source_start + count]
    return flat
