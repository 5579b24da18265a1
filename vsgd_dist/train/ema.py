"""An exponential moving average of the weights, kept in fp32 on every engine.

It averages this rank's own part of each parameter (the local shard of an FSDP2 DTensor,
the whole tensor elsewhere), so it costs what the parameters cost and needs no collective.
fp32 matters with bf16 weights: at decay 0.9999 a bf16 average would round every update away.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from vsgd_dist.distributed import local_tensor


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [local_tensor(p.detach()) for p in model.parameters()]
        self.averages = [p.float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.averages, [p.float() for p in self.params], 1 - self.decay)

    @contextmanager
    def swapped_in(self):
        """The model holds the averages inside the block, its own weights again after."""
        saved = [p.clone() for p in self.params]
        with torch.no_grad():
            for p, average in zip(self.params, self.averages):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)

    def state(self) -> list[torch.Tensor]:
        return self.averages

    def load(self, averages: list[torch.Tensor]) -> None:
        shapes = [tuple(a.shape) for a in averages]
        if shapes != [tuple(a.shape) for a in self.averages]:
            raise ValueError("the checkpoint's weight EMA was saved with another sharding of the weights "
                             "(FSDP2 at another world size or engine.shard_within); resume with the layout it "
                             "was written with, or with train.ema_decay=0")
        torch._foreach_copy_(self.averages, [a.float() for a in averages])
