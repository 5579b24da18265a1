"""Learning-rate multipliers per optimizer step: linear warmup, then a registered shape."""
from __future__ import annotations

import math
from typing import Callable

from vsgd_dist.registry import Registry

# A shape maps (ScheduleConfig, steps since warmup, steps after warmup, steps per epoch) to
# the LR multiplier.
SCHEDULES: Registry[Callable[..., float]] = Registry("schedule")


def _cosine(cfg, step: int, span: int, steps_per_epoch: int) -> float:
    progress = min(step / max(1, span), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(cfg, step: int, span: int, steps_per_epoch: int) -> float:
    """Straight down to min_lr_ratio at the last step: after a linear warmup, the triangular
    ("cyclic") schedule of ffcv-imagenet's ResNet runs."""
    progress = min(step / max(1, span), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - progress)


def _step(cfg, step: int, span: int, steps_per_epoch: int) -> float:
    """Milestones count from the start of training, warmup included (as epochs do)."""
    warmup_done = cfg.warmup_steps + round(cfg.warmup_epochs * steps_per_epoch)
    return cfg.step_gamma ** sum(warmup_done + step >= e * steps_per_epoch for e in cfg.step_epochs)


SCHEDULES.register("cosine", _cosine)
SCHEDULES.register("linear", _linear)
SCHEDULES.register("step", _step)
SCHEDULES.register("constant", lambda cfg, step, span, steps_per_epoch: 1.0)


def lr_lambda(cfg, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """`cfg` is a ScheduleConfig. The multiplier for step s (0-based) applies to the update
    of step s+1, so warmup never uses a zero learning rate."""
    warmup = cfg.warmup_steps + round(cfg.warmup_epochs * steps_per_epoch)
    shape = SCHEDULES.get(cfg.name)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return shape(cfg, step - warmup, total_steps - warmup, steps_per_epoch)

    return multiplier
