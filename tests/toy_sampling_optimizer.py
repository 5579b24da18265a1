"""A toy optimizer that trains at weight samples, registered from outside the package
(VSGD_DIST_PLUGINS=toy_sampling_optimizer): what adding a sampling optimizer takes, end to end.

Antithetic shifts: weight sample k is m + s_k * spread with s_k = +1 for even k and -1 for
odd k (evaluation samples alike). A step averages the samples' gradients, a smoothed
gradient, into a momentum buffer and moves the mean m by it. The shift is the same for every
element, so it needs no noise offsets: every sharding draws the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vsgd_dist.optim.registry import OPTIMIZERS, OptimizerEntry, Sampler


class AntitheticSGD(torch.optim.Optimizer):
    """m <- m*(1 - lr*wd) - lr*v, v <- beta*v + mean over samples of g(m +- spread).
    Elementwise, one state tensor ("momentum")."""

    elementwise = True

    def __init__(self, params, lr=0.01, spread=0.01, beta=0.9, mc_samples=2, weight_decay=0.0, fused=None, seed=0):
        if not spread >= 0.0:
            raise ValueError(f"AntitheticSGD: invalid spread={spread!r}; allowed: >= 0")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AntitheticSGD: invalid beta={beta!r}; allowed range is [0, 1)")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"AntitheticSGD: invalid mc_samples={mc_samples!r}; allowed: an int >= 1")
        super().__init__(params, dict(lr=lr, spread=spread, beta=beta, mc_samples=mc_samples,
                                      weight_decay=weight_decay))
        self._means: dict[torch.Tensor, torch.Tensor] = {}  # the mean of a parameter holding a sample
        self._sums: dict[torch.Tensor, torch.Tensor] = {}  # accumulated gradients of this step

    @torch.no_grad()
    def sample(self, mc_sample: int, evaluation: bool = False) -> None:
        sign = 1.0 if mc_sample % 2 == 0 else -1.0
        for group in self.param_groups:
            for p in group["params"]:
                mean = self._means.setdefault(p, p.detach().clone())
                p.copy_(mean + sign * group["spread"])

    @torch.no_grad()
    def accumulate(self) -> None:
        for p in self._means:
            if p.grad is not None:
                self._sums[p] = self._sums[p] + p.grad if p in self._sums else p.grad.clone()
                p.grad = None

    @torch.no_grad()
    def mean_weights(self) -> None:
        for p, mean in self._means.items():
            p.copy_(mean)
        self._means.clear()
        self._sums.clear()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None and p not in self._sums:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["momentum"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                grad = self._sums.pop(p, torch.zeros_like(p)) + (p.grad if p.grad is not None else 0)
                state["momentum"].mul_(group["beta"]).add_(grad / group["mc_samples"])
                mean = self._means.pop(p, None)
                if mean is not None:
                    p.copy_(mean)
                p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(group["lr"] * state["momentum"])
        self.mean_weights()


@dataclass
class AntitheticHparams:
    spread: float = 0.01
    """How far each weight sample is shifted from the mean, in weight units."""
    beta: float = 0.9
    """Momentum decay of the smoothed gradient."""
    mc_samples: int = 2
    """Weight samples (forward/backward passes) per step: +spread, -spread, +spread, ..."""


SAMPLER = Sampler(sample=lambda opt, mc_sample, evaluation=False: opt.sample(mc_sample, evaluation),
                  accumulate=AntitheticSGD.accumulate, mean_weights=AntitheticSGD.mean_weights,
                  set_global_offset=lambda opt, tensor, runs: None)  # the shift is the same for every element

OPTIMIZERS.register("toy_antithetic", OptimizerEntry(AntitheticSGD, AntitheticHparams, sampler=SAMPLER,
                                                     engines=("ddp", "zero", "fsdp2")))
