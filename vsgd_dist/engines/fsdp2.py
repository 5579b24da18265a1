"""FSDP2: `fully_shard` turns parameters into DTensors sharded on dim 0; an elementwise
optimizer built on them holds 1/N of its state for free, and gradients are reduce-scattered
by FSDP itself."""
from __future__ import annotations

import torch
import torch.distributed as dist

from vsgd_dist.engines.base import Engine
from vsgd_dist.sharding.fsdp2 import shard_model


def model_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units to shard: members of a Sequential or ModuleList that hold parameters
    (ResNet blocks, ViT encoder layers), outermost first and never nested in one another."""
    blocks, names = [], []
    for name, container in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in names):
            continue
        if isinstance(container, (torch.nn.Sequential, torch.nn.ModuleList)):
            for child_name, block in container.named_children():
                if any(True for _ in block.parameters()):
                    blocks.append(block)
                    names.append(f"{name}.{child_name}" if name else child_name)
    return blocks


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, model, cfg, lr):
        # Parameters stay fp32: bf16 comes from autocast, as with the other engines.
        shard_model(model, model_blocks(model))
        super().__init__(model, cfg, lr)  # param groups over the DTensor parameters
        self.module = model
        self.optimizer = self.optimizer_class(self.param_groups, **self.optimizer_kwargs)
        self._names = {p: n for g in self.param_groups for n, p in zip(g["param_names"], g["params"])}

    def clip_grad_norm(self, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def state_bytes(self):
        return sum(_local_nbytes(v) for s in self.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    def vsgd_state_pieces(self):
        return self._vsgd_pieces_of(self.optimizer, self._names)


def _local_nbytes(tensor: torch.Tensor) -> int:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).nbytes

    def checkpoint_state(self):
        """This rank's shards of the weights and of the optimizer state, as local tensors."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: _to_local(v) for k, v in s.items()} for i, s in optimizer["state"].items()}
        return {"model": {k: _to_local(v) for k, v in self.model.state_dict().items()}, "optimizer": optimizer}

    def load_checkpoint_state(self, read, meta):
        self._require_same_world(meta)
        saved = read(dist.get_rank())
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                _to_local(tensor).copy_(saved["model"][name])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        optimizer = dict(saved["optimizer"])
        optimizer["state"] = {i: {k: _like(params[i], v) for k, v in s.items()}
                              for i, s in saved["optimizer"]["state"].items()}
        self.optimizer.load_state_dict(optimizer)


def _to_local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _like(param, value):
    """A saved local shard back as a DTensor laid out like `param` (per-element state only)."""
    from torch.distributed.tensor import DTensor

    if torch.is_tensor(value) and isinstance(param, DTensor) and value.shape == param.to_local().shape \
            and value.dim() > 0:
        return DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride())
    return value
