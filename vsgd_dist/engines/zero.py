"""Native ZeRO: the ZeroOptimizer shards optimizer state (stage 1, behind DDP) or state
and gradients (stage 2, hooks reduce-scatter gradients during backward)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vsgd_dist.engines.base import Engine
from vsgd_dist.sharding import ZeroOptimizer
from vsgd_dist.sharding.layout import owned_part


class ZeroEngine(Engine):
    name = "zero"

    def __init__(self, model, cfg, lr):
        super().__init__(model, cfg, lr)
        stage = cfg.engine.zero_stage
        self.optimizer = ZeroOptimizer(self.param_groups, self.optimizer_class, stage=stage,
                                       bucket_cap_mb=cfg.engine.bucket_mb, **self.optimizer_kwargs)
        # ZeroOptimizer moved the parameters into flat buffers; DDP must wrap them after.
        self.module = (DistributedDataParallel(model, broadcast_buffers=False, bucket_cap_mb=cfg.engine.bucket_mb)
                       if stage == 1 and dist.is_initialized() else model)

    def clip_grad_norm(self, max_norm):
        return self.optimizer.clip_grad_norm_(max_norm)

    def state_bytes(self):
        return self.optimizer.state_bytes()

    def vsgd_state_pieces(self):
        opt = self.optimizer
        for slot in opt.slots:
            first, last, offset = owned_part(slot, opt.buckets[slot.bucket], opt.rank)
            state = opt.inner.state.get(opt.masters[slot.group], {})
            if first == last or "mug" not in state or int(state["step"]) == 0:
                continue
            part = slice(offset, offset + last - first)
            yield (slot.name, state["mug"][part], state["bg"][part], state["bhg"][part],
                   opt.param_groups[slot.group])

    def checkpoint_state(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = {"optimizer": self.optimizer.state_dict()}  # this rank's shard + its layout
        if rank == 0:
            state["model"] = self.model.state_dict()
        return state

    def load_checkpoint_state(self, read, meta):
        self._load_model(read(0)["model"])
        self._require_same_world(meta)
        self.optimizer.load_state_dict(read(self.optimizer.rank)["optimizer"])
