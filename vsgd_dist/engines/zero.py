"""Native ZeRO: the ZeroOptimizer shards optimizer state (stage 1, behind DDP) or state
and gradients (stage 2, hooks reduce-scatter gradients during backward), over the world or,
with engine.shard_within=node, over the ranks of each node (every node holds the same shards)."""
from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vsgd_dist.distributed import node_mesh
from vsgd_dist.engines.base import Engine
from vsgd_dist.engines.ownership import OwnedParam, OwnedRange, Ownership
from vsgd_dist.optim.registry import Sampler
from vsgd_dist.sharding import ZeroOptimizer

SHARDED_SAMPLER = Sampler(sample=ZeroOptimizer.sample, accumulate=ZeroOptimizer.accumulate,
                          mean_weights=ZeroOptimizer.mean_weights,
                          set_global_offset=lambda *_: None,  # its masters already say where they lie
                          mc_samples=ZeroOptimizer.mc_samples)
"""A ZeroOptimizer over a sampling optimizer is driven as that optimizer is."""


class ZeroEngine(Engine):
    def __init__(self, model, setup):
        super().__init__(model, setup)
        cfg = setup.engine
        mesh = node_mesh(next(model.parameters()).device.type) if cfg.shard_within == "node" else None
        self._shard_group = mesh.get_group("shard") if mesh is not None else None
        self._first_replica = mesh is None or mesh.get_local_rank("replicate") == 0
        """Whether this rank's node is the first: the other nodes hold the same shards, and only
        the first node's ranks write theirs into checkpoints."""
        self.optimizer = ZeroOptimizer(self._param_groups, setup.optimizer.optimizer_class, stage=cfg.zero_stage,
                                       process_group=self._shard_group,
                                       replicate_group=mesh.get_group("replicate") if mesh is not None else None,
                                       bucket_cap_mb=cfg.bucket_mb,
                                       prefetch=cfg.prefetch_params and not setup.compiled_forward,
                                       sampler=setup.optimizer.sampler, **setup.optimizer_kwargs())
        self.sampler = SHARDED_SAMPLER if setup.optimizer.sampler is not None else None
        if self.optimizer.prefetch:
            self._wait_in_forward(model)
        # ZeroOptimizer moved the parameters into flat buffers; DDP must wrap them after.
        self.wrapped = (DistributedDataParallel(model, broadcast_buffers=False, bucket_cap_mb=cfg.bucket_mb)
                        if cfg.zero_stage == 1 and dist.is_initialized() else model)

    def _wait_in_forward(self, model) -> None:
        """Before each module's forward, wait for the gathers of the buckets holding the
        parameters it registers (`engine.prefetch_params`)."""
        owners: dict[int, str] = {}
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in owners:
                    raise ValueError(f"engine.prefetch_params: parameter {module_name}.{name} is also "
                                     f"{owners[id(param)]} (tied weights); set engine.prefetch_params=false")
                owners[id(param)] = f"{module_name}.{name}"
            buckets = self.optimizer.buckets_of(module.parameters(recurse=False))
            if buckets:
                module.register_forward_pre_hook(lambda _module, _args, b=buckets: self.optimizer.wait_for_buckets(b))

    @property
    def model(self):
        """The model, its parameters the current weights: a gather a step left running
        (`engine.prefetch_params`) is waited for here. The training forward goes through
        `wrapped`, whose modules wait bucket by bucket instead."""
        if "optimizer" in self.__dict__:
            self.optimizer.wait_for_parameters()
        return self._model

    @model.setter
    def model(self, model):
        self._model = model

    def wait_for_parameters(self):
        self.optimizer.wait_for_parameters()

    def clip_grad_norm(self, max_norm):
        return self.optimizer.clip_grad_norm_(max_norm)

    @contextlib.contextmanager
    def no_sync(self):
        """Stage 1: DDP's no_sync; stage 2: the ZeroOptimizer's hooks skip the reduce-scatter."""
        wrapper = self.wrapped.no_sync() if self.wrapped is not self._model else contextlib.nullcontext()
        with wrapper, self.optimizer.no_sync():
            yield

    def reduced_grads(self):
        """Flat per-bucket shards, laid out like the masters."""
        return self.optimizer.reduced_grads()

    def ownership(self):
        """Each parameter's owned part of its bucket, at its place in the bucket's master; the
        optimizer state lives with the masters. Waits for a running all-gather first: it reads
        the masters that whoever asks may write."""
        opt = self.optimizer
        opt.wait_for_parameters()
        params = {}
        for slot in opt.slots:
            first, last, offset = opt.owned_in_master(slot)
            params[slot.name] = OwnedParam(slot.shape, slot.dim_order, slot.group,
                                           (OwnedRange(first, last, slot.bucket, offset),))

        def fresh_state(i):
            opt.inner.state[opt.masters[i]] = {}
            return opt.inner.state[opt.masters[i]]

        return Ownership(params=params, stores=list(opt.masters),
                         state_of=lambda i: opt.inner.state.get(opt.masters[i], {}), fresh_state=fresh_state,
                         groups=opt.param_groups,
                         names_per_group=self._names_per_group(), publish=opt.publish_masters,
                         writes=self._first_replica, shard_group=self._shard_group)
