"""AdamW (torch's implementation), the sharded-Adam baseline every comparison runs against."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vsgd_dist.optim.registry import OPTIMIZERS, OptimizerEntry


@dataclass
class AdamWHparams:
    beta1: float = 0.9
    """First-moment decay."""
    beta2: float = 0.999
    """Second-moment decay."""
    eps: float = 1e-8
    """Added to the denominator."""


def _constructor_kwargs(h: AdamWHparams) -> dict:
    return dict(betas=(h.beta1, h.beta2), eps=h.eps)


def _deepspeed_optimizer(h: AdamWHparams, lr: float, weight_decay: float, fused: bool) -> dict:
    """DeepSpeed's own AdamW section, torch's implementation (no JIT-built kernel)."""
    return {"type": "AdamW", "params": {"lr": lr, "betas": [h.beta1, h.beta2], "eps": h.eps,
                                        "weight_decay": weight_decay, "torch_adam": True, "fused": fused or None}}


OPTIMIZERS.register("adamw", OptimizerEntry(torch.optim.AdamW, AdamWHparams, _constructor_kwargs,
                                            deepspeed_optimizer=_deepspeed_optimizer, fused_by_default=True))
