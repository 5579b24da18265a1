"""A toy elementwise optimizer registered from outside the package (VSGD_DIST_PLUGINS=toy_optimizer):
what adding an optimizer takes, end to end."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vsgd_dist.optim.registry import OPTIMIZERS, OptimizerEntry


class SignMomentum(torch.optim.Optimizer):
    """m <- beta*m + (1-beta)*g; p <- p*(1 - lr*wd) - lr*sign(m). Elementwise, one state tensor."""

    elementwise = True

    def __init__(self, params, lr=0.01, beta=0.9, weight_decay=0.0, fused=None):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"SignMomentum: invalid beta={beta!r}; allowed range is [0, 1)")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["momentum"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                state["momentum"].lerp_(p.grad.float(), 1 - group["beta"])
                p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(group["lr"] * state["momentum"].sign())


@dataclass
class SignMomentumHparams:
    beta: float = 0.9
    """Momentum decay."""


OPTIMIZERS.register("toy_sign", OptimizerEntry(SignMomentum, SignMomentumHparams))
