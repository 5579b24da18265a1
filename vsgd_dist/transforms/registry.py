"""The gradient-transform registry: what rewrites the averaged gradient before the optimizer.

A gradient transform is not an optimizer: it edits the gradient every optimizer then consumes
(alpha-SVRG's variance reduction). Each registered transform owns a recipe section of the
same name (`RunConfig.<name>`, a dataclass with one docstring per field), its range checks
(run by `RunConfig.check`, so a bad value fails in the launcher) and a builder. The trainer
builds those that are on and drives them through the `GradientTransform` methods; the engine
calls `apply` on this rank's averaged gradient (`Engine.reduced_grads()`) after the reduction,
before clipping and the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from vsgd_dist.registry import Registry


class GradientTransform:
    """What the trainer calls; every method but `apply` has a do-nothing default."""

    name: str = ""
    """Its registry name: the recipe section, and the prefix of its checkpoint and log keys."""

    def prepare(self, step: int, epoch: int, steps_ahead: Callable[[int], Iterator[list]]) -> int:
        """Before the loader is opened at `step`: read batches ahead if needed (`steps_ahead(n)`
        yields the next n steps' micro-batch lists, the batches training will see); return how
        many steps may run before `prepare` is due again."""
        return 2**62

    def before_step(self, step: int, epoch: int, micro_batches: list) -> None:
        """Before the forward/backward of `step` on `micro_batches`."""

    def apply(self, grads: list[torch.Tensor]) -> None:
        """Edit this rank's averaged gradient in place (the engine calls it)."""
        raise NotImplementedError

    def log_values(self) -> dict[str, float]:
        """Scalars to log at a log step; called on every rank (it may reduce over ranks)."""
        return {}

    def state_dict(self) -> tuple[dict, dict[str, list[torch.Tensor]]]:
        """(plain values, {key: tensors laid out like `Engine.reduced_grads()`}) for checkpoints:
        the tensors go through the engine, so they reshard to any world size and engine."""
        return {}, {}

    def load_state_dict(self, values: dict | None, tensors: dict[str, list[torch.Tensor]], step: int) -> None:
        """Resume at `step` from `state_dict()`'s parts (values None: nothing was saved)."""


@dataclass(frozen=True)
class TransformEntry:
    config: type
    """Dataclass of its recipe section `RunConfig.<name>` (one docstring per field)."""
    enabled: Callable[[Any], bool]
    """section -> whether the run uses it (off: nothing is built, training is as without it)."""
    check: Callable[[Any, Any], None]
    """(section, RunConfig) -> raise ValueError with a one-line message naming the fix."""
    build: Callable[..., GradientTransform]
    """(section, *, engine, gradient, total_steps, steps_per_epoch, log_every) -> the transform;
    `gradient(micro_batches)` runs forward/backward at the weights the model holds and returns
    `engine.reduced_grads()`."""


GRADIENT_TRANSFORMS: Registry[TransformEntry] = Registry("gradient transform")


def build_transforms(cfg, **context) -> list[GradientTransform]:
    """The transforms `cfg` (a RunConfig) turns on, in registry order."""
    built = []
    for name, entry in GRADIENT_TRANSFORMS.items():
        section = getattr(cfg, name)
        if entry.enabled(section):
            transform = entry.build(section, **context)
            transform.name = name
            built.append(transform)
    return built
