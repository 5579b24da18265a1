"""Param groups for any optimizer: weight decay for weights, none for norms and biases."""
from __future__ import annotations

from torch import nn


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
