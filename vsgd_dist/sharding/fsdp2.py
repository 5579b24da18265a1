"""FSDP2 (`fully_shard`) for VSGD and AdamW: parameters, gradients and state all sharded.

Which sharding to use:
- ZeRO-1 (`ZeroOptimizer(stage=1)` on a DDP model): least change to a DDP recipe; only the
  optimizer state is sharded (VSGD: 12 bytes/param become 12/W). Gradients are all-reduced.
- ZeRO-2 (`ZeroOptimizer(stage=2)`, model NOT wrapped): also shards gradients, with the
  same bytes on the wire as DDP (reduce-scatter + all-gather = one all-reduce). The default
  for ResNets and ViT-B on 8-64 GPUs, where full parameters still fit on each GPU.
- FSDP2 (this module): also shards the parameters (gathered per block for forward and
  backward), for models whose parameters do not fit on one device or when activation
  memory needs the room; costs one more all-gather per block in backward. Optimizer state
  lives on the DTensor shards, so any elementwise optimizer works unchanged, and
  torch.distributed.checkpoint reshards it on load.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vsgd_dist.sharding.zero import check_elementwise


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], *, mesh: DeviceMesh | None = None,
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
                reshard_after_forward: bool = True) -> nn.Module:
    """`fully_shard` each block, then the root (which takes the parameters left over).

    `param_dtype=torch.bfloat16` computes in bf16 while the sharded parameters and the
    optimizer stay fp32; gradients are reduced in `reduce_dtype`.
    """
    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def sharded_optimizer(params: Iterable, optimizer_class: type, **optimizer_kwargs) -> torch.optim.Optimizer:
    """An elementwise optimizer on DTensor parameters: its state is sharded like them."""
    check_elementwise(optimizer_class)
    return optimizer_class(params, **optimizer_kwargs)


def diagnostics(optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]],
                param_to_group: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """VSGD diagnostics per layer group over the local shards, reduced across ranks."""
    from vsgd_dist.optim.diagnostics import reduced_diagnostics

    param_to_group = param_to_group or {}
    named = list(named_params)
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    pieces = []
    for name, param in named:
        state = optimizer.state.get(param)
        if not state:
            raise ValueError(f"no optimizer state for {name}: take a step before asking for diagnostics")
        local = [t.to_local() if isinstance(t, DTensor) else t for t in (state["mug"], state["bg"], state["bhg"])]
        pieces.append((name, *local, group_of[param]))
    means, _ = reduced_diagnostics(pieces, lambda n: param_to_group.get(n, n), reduce=True, device=named[0][1].device)
    return means
