"""Param groups for any optimizer: weight decay for weights, none for norms and biases.

Every engine builds its optimizer from these groups (ZeRO's flat shards, FSDP2's DTensors,
DeepSpeed's partitions are all per group), so which tensors decay is the same at any world
size and on any engine."""
from __future__ import annotations

from torch import nn


def named_param_groups(model: nn.Module, weight_decay: float, exclude_1d: bool = True) -> list[dict]:
    """Weights with decay and, with `exclude_1d` (`optim.wd_exclude_1d`), a second group of
    norms and biases (tensors of at most one dimension) without. Groups carry `param_names`
    so sharded optimizers can name what they hold."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if exclude_1d and param.ndim <= 1 else decay).append((name, param))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                           "weight_decay": wd})
    return groups
