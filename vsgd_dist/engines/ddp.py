"""DDP: gradients all-reduced, every rank holds the whole optimizer state (the baseline)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vsgd_dist.engines.base import Engine
from vsgd_dist.engines.ownership import whole_params


class DDPEngine(Engine):
    def __init__(self, model, setup):
        super().__init__(model, setup)
        # Each rank keeps its own BatchNorm statistics (as ZeRO and FSDP2 do); before
        # evaluation and checkpoints every rank takes rank 0's (`sync_buffers`), instead of
        # DDP broadcasting them every step.
        self.wrapped = (DistributedDataParallel(model, broadcast_buffers=False, bucket_cap_mb=setup.engine.bucket_mb)
                        if dist.is_initialized() else model)
        self.optimizer = setup.optimizer.optimizer_class(self._param_groups, **setup.optimizer_kwargs())

    def no_sync(self):
        return self.wrapped.no_sync() if self.wrapped is not self.model else super().no_sync()

    def clip_grad_norm(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def ownership(self):
        """Whole tensors on every rank; rank 0 writes them."""
        return whole_params(self._named_params(), self.optimizer.param_groups, self._names_per_group(),
                            self.optimizer, sharded_state=False, sharded_grads=False,
                            writes=not dist.is_initialized() or dist.get_rank() == 0)
