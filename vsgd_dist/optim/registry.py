"""The optimizer registry: what a recipe's `optim.name` can select.

An entry ties an optimizer class to the dataclass of its recipe hyperparameters (the
`optim.<name>` section, one docstring per field) and says how to build it. Registering one
(`OPTIMIZERS.register("name", OptimizerEntry(...))` next to its code, plus an import in
`vsgd_dist/optim/__init__.py`) makes it a recipe choice: config validation, `did you mean`,
the engines, checkpoints (which record its class) and the report pick it up from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vsgd_dist.registry import Registry


@dataclass(frozen=True)
class OptimizerEntry:
    optimizer_class: type[torch.optim.Optimizer]
    hparams: type
    """Dataclass of the recipe's `optim.<name>` section: its fields are constructor arguments."""
    constructor_kwargs: Callable[[Any], dict] = dataclasses.asdict
    """Recipe hyperparameters -> constructor keyword arguments (besides lr, weight_decay, fused)."""
    deepspeed_optimizer: Callable[[Any, float, float, bool], dict] | None = None
    """(hparams, lr, weight_decay, fused) -> DeepSpeed's own `optimizer` config section;
    None: DeepSpeed steps this class as a client optimizer."""
    diagnostics: bool = False
    """Whether the trainer logs per-layer diagnostics of this optimizer's state."""

    def kwargs(self, hparams, lr: float, weight_decay: float, fused: bool) -> dict:
        return dict(lr=lr, weight_decay=weight_decay, fused=fused or None, **self.constructor_kwargs(hparams))

    def validate(self, hparams, lr: float = 0.0, weight_decay: float = 0.0) -> None:
        """Raise ValueError for values the optimizer refuses, by building it on one scalar
        parameter: its own checks are the single source of allowed ranges."""
        self.optimizer_class([torch.zeros(1, requires_grad=True)],
                             **self.kwargs(hparams, lr, weight_decay, fused=False))


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")
