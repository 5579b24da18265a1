"""From a recipe's optimizer section to an optimizer class, its arguments and param groups."""
from __future__ import annotations

import torch
from torch import nn

from vsgd_dist.optim.vsgd import VSGD


def optimizer_class_and_kwargs(cfg, lr: float) -> tuple[type[torch.optim.Optimizer], dict]:
    """`cfg` is an OptimConfig; `lr` the peak LR after the linear scaling rule."""
    if cfg.name == "vsgd":
        return VSGD, dict(lr=lr, ghattg=cfg.ghattg, ps=cfg.ps, tau1=cfg.tau1, tau2=cfg.tau2, eps=cfg.eps,
                          fused=cfg.fused or None)
    if cfg.name == "adamw":
        return torch.optim.AdamW, dict(lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cfg.fused or None)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose vsgd or adamw")


def named_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay, and norms and biases (tensors of at most one
    dimension) without. Groups carry `param_names` so sharded optimizers can name what
    they hold."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append((name, param))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                           "weight_decay": wd})
    return groups
