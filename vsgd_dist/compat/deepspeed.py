"""DeepSpeed: what the engine relies on beyond DeepSpeed's public API.

Written for deepspeed 0.19.8 (`WRITTEN_FOR`); tests/test_compat.py fails when another version
is installed, so that each piece below is checked again on an upgrade.

- `fragment_of`: where a parameter's elements lie in ZeRO's flat fp32 partitions, read from
  the private `_hp_mapping` ZeRO-1/2 attaches to every parameter (group index, the slice of
  the parameter and of the partition). DeepSpeed's public `safe_get_full_fp32_param` gathers
  whole tensors instead of saying where this rank's slice is. Can go when DeepSpeed exposes
  the fragment addresses publicly, or when checkpoints go through DeepSpeed's universal
  checkpoint format.
- `skip_shm_comm_build`: replaces the CPU accelerator with a subclass that reports no builder
  for the shared-memory comm op (`CPU_Accelerator.create_op_builder`), which DeepSpeed would
  otherwise compile with g++ (~50 s) in every process on CPU. Can go when DeepSpeed builds it
  lazily, only for the inference all-reduce that uses it.
"""
from __future__ import annotations

import torch

WRITTEN_FOR = {"deepspeed": "0.19.8"}


def fragment_of(param: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(param group index, first element in the parameter, first element in this rank's flat
    partition of the group, element count) of the part of `param` this rank holds, or None
    when it holds none of it."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
    return mapping.param_group_index, lp.start, hp.start, hp.numel


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-compiling its shared-memory comm op.

    Every process that creates DeepSpeed's comm backend on the CPU accelerator would build
    `deepspeed_shm_comm` with g++ (~50 s on a fresh machine). Only inference all-reduce
    uses it; ZeRO training talks through torch.distributed (gloo). The accelerator reports no
    builder for it, so DeepSpeed goes on without it. Other accelerators are left alone.
    """
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class CPUAcceleratorWithoutShm(CPU_Accelerator):
        def create_op_builder(self, op_name):
            return None if op_name == "ShareMemCommBuilder" else super().create_op_builder(op_name)

    if type(get_accelerator()) is CPU_Accelerator:
        set_accelerator(CPUAcceleratorWithoutShm())
