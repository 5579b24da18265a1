"""DeepSpeed ZeRO-1/2 (`deepspeed.initialize`): the peer engine, with VSGD as a client optimizer.

ZeRO flattens each param group and gives the optimizer ONE flat fp32 partition per group,
calling `step()` once per group with `param_groups` narrowed to it. VSGD is elementwise and
keeps its step count per tensor, so it gives the unsharded result on those partitions (it
needs `zero_allow_untested_optimizer`). AdamW comes from DeepSpeed's own optimizer config
(torch's implementation: no JIT-built kernel), the sharded-Adam baseline users know.

Precision: with train.precision=bf16 DeepSpeed keeps bf16 parameters and gradients and fp32
master partitions (its usual mixed precision). The trainer's bf16 autocast stays on: it casts
the fp32 inputs for the bf16 weights and keeps losses in fp32.

DeepSpeed is imported only when the engine is built (it takes seconds).
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from vsgd_dist.compat.deepspeed import fragment_of, skip_shm_comm_build
from vsgd_dist.engines.base import Engine
from vsgd_dist.engines.ownership import OwnedParam, OwnedRange, Ownership
from vsgd_dist.engines.setup import EngineSetup


def deepspeed_config(setup: EngineSetup, world_size: int, cuda: bool | None = None) -> dict:
    """The DeepSpeed config for an engine setup at `world_size` ranks (`cuda`: whether the
    ranks train on GPUs, default: whether this machine has one).

    ZeRO settings, chosen (`bench/deepspeed_step.py --variants` measures them):
    - bucket sizes: engine.bucket_mb, as the native engines use. DeepSpeed's default, 5e8
      elements, allocates a 1.9 GiB fp32 bucket buffer for every backward (device memory on
      a GPU) for no measured speed-up;
    - contiguous_gradients: gradients are copied into that buffer as they arrive (no
      fragmentation, and the partition is read from it without another gather);
    - overlap_comm on GPUs only: there the reduction runs on a side stream while backward
      continues, at the cost of a second bucket buffer. DeepSpeed's CPU accelerator has no
      streams; measured on CPU, overlap_comm and contiguous_gradients change the step by
      less than the run-to-run noise (10%).
    """
    bf16 = setup.precision == "bf16"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    # DeepSpeed counts buckets in elements of the gradient dtype.
    bucket_elements = int(setup.engine.bucket_mb * 2**20) // (2 if bf16 else 4)
    config = {
        "train_batch_size": setup.global_batch,
        "train_micro_batch_size_per_gpu": setup.global_batch // (world_size * setup.accum_steps),
        "gradient_accumulation_steps": setup.accum_steps,
        "gradient_clipping": setup.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": setup.engine.zero_stage, "reduce_bucket_size": bucket_elements,
                              "allgather_bucket_size": bucket_elements, "contiguous_gradients": True,
                              "overlap_comm": cuda},
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
    }
    entry = setup.optimizer
    if entry.deepspeed_optimizer is None:
        config["zero_allow_untested_optimizer"] = True  # ours: a client optimizer
    else:
        config["optimizer"] = entry.deepspeed_optimizer(setup.hparams, setup.lr, setup.weight_decay,
                                                        entry.use_fused(setup.fused))
    return config


class DeepSpeedEngine(Engine):
    def __init__(self, model, setup):
        super().__init__(model, setup)
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        skip_shm_comm_build()
        world = dist.get_world_size() if dist.is_initialized() else 1
        # Before initialize: ZeRO swaps each group's "params" for its flat partition.
        self._named = [(n, p) for g in self._param_groups for n, p in zip(g["param_names"], g["params"])]
        client = (setup.optimizer.optimizer_class(self._param_groups, **setup.optimizer_kwargs())
                  if setup.optimizer.deepspeed_optimizer is None else None)
        self._ds, self._zero, _, _ = deepspeed.initialize(
            model=model, optimizer=client, model_parameters=None if client else self._param_groups,
            config=deepspeed_config(setup, world))
        self.wrapped = self._ds
        self.optimizer = self._zero.optimizer  # the torch optimizer on the flat partitions
        if setup.precision == "bf16":
            # DeepSpeed casts the parameters to bf16 but not the buffers; BatchNorm then
            # refuses fp32 running statistics next to its bf16 weight.
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(torch.bfloat16)

    def backward(self, loss):
        self._ds.backward(loss, scale_wrt_gas=False)  # the trainer already divides by accum_steps

    @contextlib.contextmanager
    def no_sync(self):
        """Not the accumulation boundary: ZeRO accumulates this backward's gradients into its
        partitions and the step waits (DeepSpeed's own `no_sync` refuses stage 2). The trainer
        steps once per optimizer step, so the boundary is set by hand rather than counted."""
        self._ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self._ds.set_gradient_accumulation_boundary(True)

    def reduced_grads(self):
        raise NotImplementedError("DeepSpeed reduces, clips and steps inside step(); its averaged gradient "
                                  "is not handed out (gradient transforms need engine zero, ddp or fsdp2)")

    def step(self):
        """DeepSpeed clips (gradient_clipping) and zeroes the gradients inside its step. Its
        norm is a tensor on the device: returned as it is, without a host sync."""
        self._ds.step()
        norm = self._ds.get_global_grad_norm()
        return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm))

    def clip_grad_norm(self, max_norm):
        raise NotImplementedError("DeepSpeed clips inside step() (gradient_clipping = train.grad_clip); "
                                  "call step()")

    def _named_params(self):
        return self._named

    def ownership(self):
        """Each parameter's fragment in this rank's flat fp32 partition of its group
        (`compat.deepspeed.fragment_of`); the optimizer state lives with the partitions."""
        partitions = list(self._zero.single_partition_of_fp32_groups)
        params = {}
        group_of = {n: g for g, names in enumerate(self._names_per_group()) for n in names}
        for name, param in self._named:
            fragment = fragment_of(param)
            ranges = () if fragment is None else (
                OwnedRange(fragment[1], fragment[1] + fragment[3], fragment[0], fragment[2]),)
            params[name] = OwnedParam(tuple(param.shape), tuple(range(param.dim())), group_of[name], ranges)
        groups = self.optimizer.param_groups

        def publish():
            raise NotImplementedError("DeepSpeed copies its fp32 partitions into the parameters inside its "
                                      "step only; weights cannot be set from outside")

        def fresh_state(i):
            self.optimizer.state[groups[i]["params"][0]] = {}
            return self.optimizer.state[groups[i]["params"][0]]

        return Ownership(params=params, stores=partitions,
                         state_of=lambda i: self.optimizer.state.get(groups[i]["params"][0], {}),
                         fresh_state=fresh_state, groups=groups,
                         names_per_group=self._names_per_group(), publish=publish)
