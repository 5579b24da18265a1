"""Private torch names the project relies on.

- `torch.distributed.tensor._utils.compute_local_shape_and_global_offset` is the one place
  torch computes where a DTensor's local shard starts in the global tensor; IVON keys its noise
  by global element index and needs that start for FSDP2's dim-0 shards.
- `torch._subclasses.fake_tensor.FakeTensorMode` and `torch.distributed._tools.mem_tracker`
  measure the memory of a forward/backward without allocating it (the memory plan's
  activation peak at a GPU's real batch, on a CPU).

Written for torch 2.13.0. Each can go when torch makes it public (DTensor has no public
accessor for the offset in 2.13; the memory tracker lives under `_tools`); tests/test_compat.py
fails when the pin changes, and the tests of their users (DTensor shards against plain tensors
in tests/test_ivon.py, the activation estimate against a measured CPU peak in
tests/test_memory_plan.py) fail if torch's answers change.
"""
from __future__ import annotations

from typing import Callable

import torch

WRITTEN_FOR = {"torch": "2.13.0"}


def dtensor_global_offset(param: torch.Tensor) -> tuple[int, ...]:
    """Where this rank's local shard of DTensor `param` starts, per dimension of the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offset)


def fake_activation_peak(model: torch.nn.Module, forward_backward: Callable[[torch.nn.Module], None]) -> int:
    """Bytes of activations and temporaries alive at the peak of `forward_backward(model)`, run on
    fake tensors: `model` (built on the meta device) and every tensor made inside become fake CPU
    tensors, so nothing is allocated whatever the batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            forward_backward(model)
        peak = tracker.get_tracker_snapshot("peak")
    by_kind = next(iter(peak.values()))
    return int(by_kind[_MemRefType.ACT] + by_kind[_MemRefType.TEMP])
