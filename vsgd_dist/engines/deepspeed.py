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

from vsgd_dist.engines.base import Engine
from vsgd_dist.optim import OPTIMIZERS
from vsgd_dist.full_form import assemble, groups_in_order, hyperparameters


def deepspeed_config(cfg, world_size: int, lr: float, cuda: bool | None = None) -> dict:
    """The DeepSpeed config for a RunConfig at `world_size` ranks (`lr`: the peak LR; `cuda`:
    whether the ranks train on GPUs, default: whether this machine has one).

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
    tc, o = cfg.train, cfg.optim
    bf16 = tc.precision == "bf16"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    # DeepSpeed counts buckets in elements of the gradient dtype.
    bucket_elements = int(cfg.engine.bucket_mb * 2**20) // (2 if bf16 else 4)
    config = {
        "train_batch_size": tc.global_batch,
        "train_micro_batch_size_per_gpu": tc.global_batch // (world_size * tc.accum_steps),
        "gradient_accumulation_steps": tc.accum_steps,
        "gradient_clipping": tc.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": cfg.engine.zero_stage, "reduce_bucket_size": bucket_elements,
                              "allgather_bucket_size": bucket_elements, "contiguous_gradients": True,
                              "overlap_comm": cuda},
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
    }
    entry = OPTIMIZERS.get(o.name)
    if entry.deepspeed_optimizer is None:
        config["zero_allow_untested_optimizer"] = True  # ours: a client optimizer
    else:
        config["optimizer"] = entry.deepspeed_optimizer(o.hparams, lr, o.weight_decay, entry.use_fused(o.fused))
    return config


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


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model, cfg, lr):
        super().__init__(model, cfg, lr)
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        skip_shm_comm_build()
        world = dist.get_world_size() if dist.is_initialized() else 1
        # Before initialize: ZeRO swaps each group's "params" for its flat partition.
        self._named = [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])]
        client = (self.optimizer_class(self.param_groups, **self.optimizer_kwargs)
                  if OPTIMIZERS.get(cfg.optim.name).deepspeed_optimizer is None else None)
        self.ds, zero, _, _ = deepspeed.initialize(
            model=model, optimizer=client, model_parameters=None if client else self.param_groups,
            config=deepspeed_config(cfg, world, lr))
        self.wrapped = self.ds
        self.zero = zero
        self.optimizer = zero.optimizer  # the torch optimizer on the flat partitions
        if cfg.train.precision == "bf16":
            # DeepSpeed casts the parameters to bf16 but not the buffers; BatchNorm then
            # refuses fp32 running statistics next to its bf16 weight.
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(torch.bfloat16)

    def backward(self, loss):
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer already divides by accum_steps

    @contextlib.contextmanager
    def no_sync(self):
        """Not the accumulation boundary: ZeRO accumulates this backward's gradients into its
        partitions and the step waits (DeepSpeed's own `no_sync` refuses stage 2). The trainer
        steps once per optimizer step, so the boundary is set by hand rather than counted."""
        self.ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.ds.set_gradient_accumulation_boundary(True)

    def step(self):
        """DeepSpeed clips (gradient_clipping) and zeroes the gradients inside its step. Its
        norm is a tensor on the device: returned as it is, without a host sync."""
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm))

    def clip_grad_norm(self, max_norm):
        raise NotImplementedError("DeepSpeed clips inside step() (gradient_clipping = train.grad_clip); "
                                  "call step()")

    def state_bytes(self):
        return sum(v.nbytes for s in self.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    def state_pieces(self, keys):
        """Each parameter's slice of this rank's flat partition, found through the mapping
        ZeRO keeps on every parameter (`_hp_mapping`: group index, start and length)."""
        for name, param in self._named:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # none of this parameter lives on this rank
                continue
            flat_group = self.optimizer.param_groups[mapping.param_group_index]
            state = self.optimizer.state.get(flat_group["params"][0], {})
            if keys[0] not in state or int(state["step"]) == 0:
                continue
            address = mapping.get_hp_fragment_address()
            part = slice(address.start, address.start + address.numel)
            yield name, *(state[k][part] for k in keys), flat_group

    def checkpoint_state(self):
        """This rank's fp32 partitions and optimizer state (plain tensors, for weights_only
        loading), and where each parameter's fragment lies in them; rank 0 adds the model."""
        state = {"fp32_partitions": [t.detach() for t in self.zero.single_partition_of_fp32_groups],
                 "optimizer": self.optimizer.state_dict(), "global_steps": self.ds.global_steps,
                 "param_names": self._names_per_group(), "fragments": self._fragments()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            state["model"] = self.model.state_dict()
        return state

    def _fragments(self) -> dict[str, list[int]]:
        """name -> [group, first element in the parameter, first element in this rank's
        partition, element count], from the mapping ZeRO keeps on each parameter."""
        fragments = {}
        for name, param in self._named:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
                fragments[name] = [mapping.param_group_index, lp.start, hp.start, hp.numel]
        return fragments

    def _load_own_shard(self, read, meta):
        if meta["engine"] != self.name or meta["world_size"] != (dist.get_world_size() if dist.is_initialized() else 1):
            return False
        state = read(dist.get_rank() if dist.is_initialized() else 0)
        mine = self.zero.single_partition_of_fp32_groups
        if state["fragments"] != self._fragments() or [t.shape for t in state["fp32_partitions"]] != \
                [t.shape for t in mine]:
            return False  # other bucket sizes or parameters: go through the full form
        self._load_model(read(0)["model"])
        for current, value in zip(mine, state["fp32_partitions"]):
            current.data.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.ds.global_steps = state["global_steps"]
        return True

    def load_full_state(self, full):
        """Fill this rank's flat partitions from the full form, fragment by fragment; any
        per-element state key moves, whatever the optimizer calls it."""
        self._load_model(full["model"])
        groups = groups_in_order(full, self._names_per_group())
        fragments = self._fragments()
        for index, (names, saved, partition) in enumerate(zip(self._names_per_group(), groups,
                                                               self.zero.single_partition_of_fp32_groups)):
            mine = [(name, fragments[name]) for name in names if name in fragments]
            master = full["master"]
            partition.data.copy_(_partition(partition, mine, lambda n: master.get(n, full["model"][n]).float()))
            states = [full["optimizer"][n] for n in names if full["optimizer"].get(n)]
            state = {}
            for key, value in (states[0].items() if states else ()):
                if torch.is_tensor(value) and value.dim() > 0:  # per element; counters are 0-d
                    state[key] = _partition(partition, mine, lambda n: full["optimizer"][n][key]).to(value.dtype)
                else:
                    state[key] = value.clone() if torch.is_tensor(value) else value
            self.optimizer.state[partition] = state
            self.optimizer.param_groups[index].update(hyperparameters(saved))  # initial_lr included
        self.ds.global_steps = full["step"]

    @classmethod
    def _full_state_parts(cls, read, meta):
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


def _partition(like: torch.Tensor, fragments: list, full_of) -> torch.Tensor:
    """A flat partition shaped like `like` holding each named fragment of `full_of(name)`."""
    flat = torch.zeros_like(like)
    for name, (_, param_start, start, count) in fragments:
        flat[start:start + count] = full_of(name).reshape(-1)[param_start:param_start + count]
    return flat
