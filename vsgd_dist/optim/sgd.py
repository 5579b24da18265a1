"""SGD with momentum (torch's implementation): the optimizer of ffcv-imagenet's ResNet rows,
the anchors the ImageNet recipes are measured against (`recipes/imagenet/resnet50_sgd_*`).

Weight decay is torch's coupled L2 (added to the gradient before momentum), as in
ffcv-imagenet. It is elementwise, so ZeroOptimizer shards it and DeepSpeed steps it as a
client optimizer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vsgd_dist.optim.registry import OPTIMIZERS, OptimizerEntry


@dataclass
class SGDHparams:
    momentum: float = 0.9
    """Heavy-ball momentum (ffcv-imagenet: 0.9)."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""


def _constructor_kwargs(h: SGDHparams) -> dict:
    return dict(momentum=h.momentum, nesterov=h.nesterov)


OPTIMIZERS.register("sgd", OptimizerEntry(torch.optim.SGD, SGDHparams, _constructor_kwargs))
