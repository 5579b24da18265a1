"""Learning-rate multipliers per optimizer step: linear warmup, then cosine, step or flat."""
from __future__ import annotations

import math
from typing import Callable


def lr_lambda(cfg, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """`cfg` is a ScheduleConfig. The multiplier for step s (0-based) applies to the update
    of step s+1, so warmup never uses a zero learning rate."""
    warmup = cfg.warmup_steps + round(cfg.warmup_epochs * steps_per_epoch)
    milestones = [e * steps_per_epoch for e in cfg.step_epochs]

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.name == "step":
            return cfg.step_gamma ** sum(step >= m for m in milestones)
        return 1.0

    return multiplier
