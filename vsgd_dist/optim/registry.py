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
class Diagnostics:
    """Per-layer diagnostics of an optimizer's state, logged to TensorBoard as
    `<optimizer>/<stat>/<layer group>` means and `<optimizer>_hist/<stat>` histograms."""

    state_keys: tuple[str, ...]
    """The per-element state tensors the statistics are computed from."""
    fields: Callable[..., dict[str, torch.Tensor]]
    """(state tensors in `state_keys` order, hyperparameters of their group) -> {stat: one
    value per element}: elementwise, so flat slices and shards add up to the whole."""
    histograms: dict[str, tuple[str, float, float]]
    """stat -> (transform, low, high) of its fixed-bin histogram; transform "log10" for
    quantities spanning decades, else "linear". These are the stats logged."""


def _mc_samples_of_groups(optimizer: torch.optim.Optimizer) -> int:
    return optimizer.param_groups[0]["mc_samples"]


@dataclass(frozen=True)
class Sampler:
    """The capability of an optimizer that trains at weight samples (IVON): how the engines
    and `ZeroOptimizer` drive it. Each field takes the optimizer instance first; nothing is
    looked up on the optimizer by name."""

    sample: Callable[..., None]
    """(optimizer, mc_sample, evaluation=bool): write weight sample `mc_sample` into the
    parameters (evaluation: a posterior-predictive sample with its own noise)."""
    accumulate: Callable[[torch.optim.Optimizer], None]
    """(optimizer): after the backward of every sample but the last, move its gradient into
    the step's sums and clear `.grad`."""
    mean_weights: Callable[[torch.optim.Optimizer], None]
    """(optimizer): put the mean weights back into the parameters, forgetting this step's
    samples (after evaluation samples; a step does it itself)."""
    set_global_offset: Callable[[torch.optim.Optimizer, torch.Tensor, list[tuple[int, int]]], None]
    """(optimizer, tensor, runs): where the elements of `tensor` (a flat shard) lie among the
    unsharded optimizer's elements, as (start, length) runs, so that each element draws the
    noise it draws unsharded (ZeRO calls it on its flat masters)."""
    mc_samples: Callable[[torch.optim.Optimizer], int] = _mc_samples_of_groups
    """(optimizer) -> weight samples (forward/backward passes) per step; default: the
    "mc_samples" of its first param group."""


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
    diagnostics: Diagnostics | None = None
    """What the trainer logs per layer about this optimizer's state (None: nothing)."""
    sampler: Sampler | None = None
    """Set for an optimizer that trains at weight samples: how to drive its samples (see
    `vsgd_dist.optim.ivon`). It then also takes the run's `seed` (train.seed) for its noise,
    the engines sample around each forward, and validation adds the posterior predictive."""
    engines: tuple[str, ...] = ()
    """The engines that can run it (empty: all); the recipe check refuses the others."""
    train_size_field: str = ""
    """A hyperparameter whose 0 means "the number of training images": the trainer fills it
    in from the dataset (`with_train_size`)."""

    fused_by_default: bool = False
    """Recipes run its fused path unless `optim.fused: false` (it needs no per-process
    compilation); otherwise only with `optim.fused: true`."""

    @property
    def sampling(self) -> bool:
        """Whether the optimizer trains at weight samples (declares a `sampler`)."""
        return self.sampler is not None

    def use_fused(self, fused: bool | None) -> bool:
        """The recipe's `optim.fused` for this optimizer (None: `fused_by_default`)."""
        return self.fused_by_default if fused is None else fused

    def kwargs(self, hparams, lr: float, weight_decay: float, fused: bool | None, seed: int = 0) -> dict:
        seeded = dict(seed=seed) if self.sampling else {}
        return dict(lr=lr, weight_decay=weight_decay, fused=self.use_fused(fused) or None, **seeded,
                    **self.constructor_kwargs(hparams))

    def with_train_size(self, hparams, train_size: int):
        """`hparams` with `train_size_field` set to `train_size` where it is 0."""
        if not self.train_size_field or getattr(hparams, self.train_size_field):
            return hparams
        return dataclasses.replace(hparams, **{self.train_size_field: train_size})

    def validate(self, hparams, lr: float = 0.0, weight_decay: float = 0.0) -> None:
        """Raise ValueError for values the optimizer refuses, by building it on one scalar
        parameter: its own checks are the single source of allowed ranges."""
        self.optimizer_class([torch.zeros(1, requires_grad=True)],
                             **self.kwargs(self.with_train_size(hparams, 1), lr, weight_decay, fused=False))


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")
