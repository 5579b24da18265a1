"""DDP: gradients all-reduced, every rank holds the whole optimizer state (the baseline)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vsgd_dist.engines.base import CheckpointMismatch, Engine


class DDPEngine(Engine):
    name = "ddp"
    sharded_state = False

    def __init__(self, model, cfg, lr):
        super().__init__(model, cfg, lr)
        # Each rank keeps its own BatchNorm statistics (as ZeRO and FSDP2 do); they are
        # averaged before evaluation instead of broadcast from rank 0 every step.
        self.module = (DistributedDataParallel(model, broadcast_buffers=False,
                                               bucket_cap_mb=cfg.engine.bucket_mb)
                       if dist.is_initialized() else model)
        self.optimizer = self.optimizer_class(self.param_groups, **self.optimizer_kwargs)
        self._names = {p: n for g in self.param_groups for n, p in zip(g["param_names"], g["params"])}

    def clip_grad_norm(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def state_bytes(self):
        return sum(v.nbytes for s in self.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    def vsgd_state_pieces(self):
        return self._vsgd_pieces_of(self.optimizer, self._names)

    def checkpoint_state(self):
        # Replicated: rank 0's file holds everything; the other ranks' files stay small.
        if dist.is_initialized() and dist.get_rank() > 0:
            return {}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, read, meta):
        if meta["engine"] != self.name:
            raise CheckpointMismatch(f"checkpoint was written by the {meta['engine']} engine, not ddp")
        state = read(0)
        self._load_model(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # replicated: any world size
