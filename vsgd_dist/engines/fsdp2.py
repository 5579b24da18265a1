"""FSDP2: `fully_shard` turns parameters into DTensors sharded on dim 0; an elementwise
optimizer built on them holds 1/N of its state for free, and gradients are reduce-scattered
by FSDP itself. With engine.shard_within=node it is HSDP: the mesh is (replicate, shard) =
nodes x ranks per node, parameters and state are sharded inside each node and replicated
across nodes, gradients reduce-scattered inside the node and all-reduced across nodes."""
from __future__ import annotations

import contextlib

import torch

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from vsgd_dist.distributed import node_mesh
from vsgd_dist.engines.base import Engine
from vsgd_dist.engines.ownership import OwnedRange, whole_params

BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


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


def shard_mesh(device_type: str, shard_within: str) -> DeviceMesh:
    """The mesh to shard over: 1-D over the world, or (replicate, shard) over nodes x ranks per
    node (`vsgd_dist.distributed.node_mesh`) for shard_within=node on several nodes."""
    mesh = node_mesh(device_type) if shard_within == "node" else None
    return mesh if mesh is not None else init_device_mesh(device_type, (dist.get_world_size(),))


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], policy: MixedPrecisionPolicy,
                mesh: DeviceMesh) -> None:
    """`fully_shard` each block, then the root (which takes the parameters left over), over
    `mesh` (a 2-D mesh makes it HSDP).

    Parameters are made contiguous first: `fully_shard` refuses the NHWC strides of a
    channels_last model's conv weights. Convolutions still run NHWC, because torch picks
    channels_last when the input is (the loaders deliver channels_last images). With a
    low-precision `policy.param_dtype`, each BatchNorm is a unit of its own whose parameters
    stay fp32: its running statistics are fp32 buffers, and batch_norm takes bf16 inputs
    with fp32 parameters but not bf16 parameters with fp32 statistics (FSDP1's
    MixedPrecision leaves BatchNorm in fp32 for the same reason)."""
    model.to(memory_format=torch.contiguous_format)  # a no-op on already-contiguous parameters
    norms = []
    if policy.param_dtype not in (None, torch.float32):
        fp32 = MixedPrecisionPolicy(reduce_dtype=policy.reduce_dtype)
        norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)
                 and any(True for _ in m.parameters())]
        for norm in norms:
            fully_shard(norm, mesh=mesh, mp_policy=fp32, reshard_after_forward=False)
    for block in blocks:
        if not any(block is norm for norm in norms):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """train.precision=bf16: parameters all-gathered (and the forward/backward run) in bf16,
    gradients reduce-scattered in fp32 into the fp32 shards the optimizer steps; fp32:
    everything fp32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(reduce_dtype=torch.float32)


class FSDP2Engine(Engine):
    def __init__(self, model, setup):
        # The shards (master weights) and the optimizer state stay fp32 at any precision.
        mesh = shard_mesh(next(model.parameters()).device.type, setup.engine.shard_within)
        shard_model(model, model_blocks(model), mixed_precision_policy(setup.precision), mesh)
        self._shard_group = mesh.get_group("shard") if mesh.ndim == 2 else None
        self._first_replica = mesh.ndim == 1 or mesh.get_local_rank("replicate") == 0
        """Whether this rank's node is the first: the other nodes hold the same rows, and only
        the first node's ranks write theirs into checkpoints."""
        super().__init__(model, setup)  # param groups over the DTensor parameters
        self.wrapped = model
        self.optimizer = setup.optimizer.optimizer_class(self._param_groups, **setup.optimizer_kwargs())

    @contextlib.contextmanager
    def no_sync(self):
        """FSDP2 keeps the unsharded gradients and skips the reduce-scatter until sync is back on."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def ownership(self):
        """Each parameter's local rows (FSDP2's dim-0 shard), written by the first node's ranks."""

        def ranges_of(index, param):
            start, stop = rows_of(param)
            row = param.numel() // param.shape[0] if param.shape[0] else 0
            return (OwnedRange(start * row, stop * row, index, 0),)

        return whole_params(self._named_params(), self.optimizer.param_groups, self._names_per_group(),
                            self.optimizer, ranges_of=ranges_of, writes=self._first_replica,
                            shard_group=self._shard_group)


def rows_of(tensor: DTensor) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 this rank holds: FSDP2 splits dim 0 over the mesh's last
    (shard) dimension as torch.chunk does (ceil(n / W) rows per rank, the last ranks get fewer
    or none); an HSDP mesh's first dimension replicates."""
    placements = tuple(tensor.placements)
    if placements[-1:] != (Shard(0),) or any(p != Replicate() for p in placements[:-1]):
        raise ValueError(f"expected a DTensor sharded on dim 0, got placements {tensor.placements}")
    mesh, shard_dim = tensor.device_mesh, len(placements) - 1
    length, per_rank = tensor.shape[0], -(-tensor.shape[0] // mesh.size(shard_dim))
    start = min(mesh.get_local_rank(shard_dim) * per_rank, length)
    stop = min(start + per_rank, length)
    if tensor.to_local().shape[0] != stop - start:
        raise ValueError(f"local shard has {tensor.to_local().shape[0]} rows, torch.chunk's split gives "
                         f"{stop - start}: FSDP2's sharding changed, update rows_of")
    return start, stop
