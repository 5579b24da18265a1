"""Private torch names the project relies on.

`torch.distributed.tensor._utils.compute_local_shape_and_global_offset` is the one place torch
computes where a DTensor's local shard starts in the global tensor; IVON keys its noise by
global element index and needs that start for FSDP2's dim-0 shards. Written for torch 2.13.0.
It can go when torch makes the offset public (DTensor has no public accessor for it in 2.13);
tests/test_compat.py fails when the pin changes, and the test of the offsets
(tests/test_ivon.py, DTensor shards against plain tensors) fails if torch's answer changes.
"""
from __future__ import annotations

import torch

WRITTEN_FOR = {"torch": "2.13.0"}


def dtensor_global_offset(param: torch.Tensor) -> tuple[int, ...]:
    """Where this rank's local shard of DTensor `param` starts, per dimension of the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offset)
