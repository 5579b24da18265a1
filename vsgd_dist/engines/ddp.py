"""DDP: gradients all-reduced, every rank holds the whole optimizer state (the baseline)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vsgd_dist.engines.base import Engine
from vsgd_dist.full_form import by_name, torch_state_dict


class DDPEngine(Engine):
    name = "ddp"
    sharded_state = False
    sharded_grads = False

    def __init__(self, model, cfg, lr):
        super().__init__(model, cfg, lr)
        # Each rank keeps its own BatchNorm statistics (as ZeRO and FSDP2 do); before
        # evaluation and checkpoints every rank takes rank 0's (`Engine.sync_buffers`),
        # instead of DDP broadcasting them every step.
        self.wrapped = (DistributedDataParallel(model, broadcast_buffers=False, bucket_cap_mb=cfg.engine.bucket_mb)
                        if dist.is_initialized() else model)
        self.optimizer = self.optimizer_class(self.param_groups, **self.optimizer_kwargs)

    def clip_grad_norm(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def state_bytes(self):
        return sum(v.nbytes for s in self.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    def state_pieces(self, keys):
        return self._state_pieces_of(self.optimizer, keys)

    def checkpoint_state(self):
        # Replicated: rank 0's file holds everything; the other ranks' files stay small.
        if dist.is_initialized() and dist.get_rank() > 0:
            return {}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_full_state(self, full):
        self._load_model(full["model"])
        self.optimizer.load_state_dict(torch_state_dict(full, self._names_per_group()))

    @classmethod
    def _full_state_parts(cls, read, meta):
        """Rank 0's file already holds everything, keyed by parameter index: key it by name."""
        saved = read(0)
        optimizer, groups = by_name(saved["optimizer"])
        return {"model": saved["model"], "optimizer": optimizer, "param_groups": groups}
