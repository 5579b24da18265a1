"""A toy gradient transform registered from outside the package (VSGD_DIST_PLUGINS=toy_transform):
Gaussian gradient noise with a decaying scale, g <- g + sigma_t z with sigma_t = scale / (1 + t)^decay
(Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks", 2015).
What adding a transform takes, end to end: this file, and nothing in the package."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vsgd_dist.distributed import all_reduce, rank_and_world
from vsgd_dist.transforms.registry import (GRADIENT_TRANSFORMS, GradientTransform, ReportColumn, TransformContext,
                                           TransformEntry)


@dataclass
class GradNoiseConfig:
    scale: float = 0.0
    """The noise's standard deviation at step 0 (0: off)."""
    decay: float = 0.55
    """sigma_t = scale / (1 + t) ** decay (the paper's gamma)."""


def check(cfg: GradNoiseConfig, run) -> None:
    if not (math.isfinite(cfg.scale) and cfg.scale >= 0):
        raise ValueError(f"grad_noise.scale={cfg.scale} must be a finite number >= 0 (0 turns the noise off)")
    if not (math.isfinite(cfg.decay) and cfg.decay >= 0):
        raise ValueError(f"grad_noise.decay={cfg.decay} must be a finite number >= 0")


class GradNoise(GradientTransform):
    """Adds sigma_t z to this rank's part of the averaged gradient; keeps the sum of the noise it
    added (laid out like the gradient, so it reshards through checkpoints)."""

    def __init__(self, cfg: GradNoiseConfig, context: TransformContext):
        self.cfg, self.engine, self.seed = cfg, context.engine, context.seed
        # Sharded gradients: each rank draws its own part; replicated ones (ddp): every rank the same.
        self.stream = rank_and_world()[0] if context.engine.ownership().sharded_grads else 0
        self.step, self.sigma, self.noised_steps = 0, 0.0, 0
        self.noise_sum: list[torch.Tensor] | None = None

    def before_step(self, step, epoch, micro_batches):
        self.step, self.sigma = step, self.cfg.scale / (1 + step) ** self.cfg.decay

    @torch.no_grad()
    def apply(self, grads):
        generator = torch.Generator(grads[0].device).manual_seed(self.seed * 1_000_003 + self.step * 1009 + self.stream)
        noise = [torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype) * self.sigma
                 for g in grads]
        torch._foreach_add_(grads, noise)
        if self.noise_sum is None:
            self.noise_sum = [torch.zeros_like(g) for g in grads]
        torch._foreach_add_(self.noise_sum, noise)
        self.noised_steps += 1

    def log_values(self):
        """grad_noise/sigma (this step's), grad_noise/noised_steps, grad_noise/sum_sq (the squared
        norm of all the noise added so far, over all ranks' parts)."""
        total = torch.zeros((), dtype=torch.float64, device=next(self.engine.model.parameters()).device)
        if self.noise_sum is not None:
            total = torch.stack(torch._foreach_norm(self.noise_sum)).double().square().sum()
        if self.engine.ownership().sharded_grads:
            total = all_reduce(total.reshape(1), process_group=self.engine.ownership().shard_group)[0]
        return {"grad_noise/sigma": self.sigma, "grad_noise/noised_steps": float(self.noised_steps),
                "grad_noise/sum_sq": float(total)}

    def state_dict(self):
        return {"noised_steps": self.noised_steps}, ({"noise_sum": self.noise_sum} if self.noise_sum else {})

    def load_state_dict(self, values, tensors, step):
        if values is not None:
            self.noised_steps = values["noised_steps"]
            self.noise_sum = tensors.get("noise_sum")


GRADIENT_TRANSFORMS.register("grad_noise", TransformEntry(
    config=GradNoiseConfig, enabled=lambda cfg: cfg.scale > 0, check=check, build=GradNoise,
    label=lambda cfg: f"gradient noise {cfg.scale:g}",
    columns=(ReportColumn("noise added (steps)", "grad_noise/noised_steps", 1, ".0f"),
             ReportColumn("noise sum of squares", "grad_noise/sum_sq", 1, ".4g"))))
