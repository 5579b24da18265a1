"""The gradient-transform registry: what rewrites the averaged gradient before the optimizer.

A gradient transform is not an optimizer: it edits the gradient every optimizer then consumes
(alpha-SVRG's variance reduction, a gradient noise). A registered transform owns, in its
`TransformEntry`:
- its recipe section: `RunConfig.<name>` is made from `config` (a dataclass, one docstring per
  field), so a transform registered from outside the package (VSGD_DIST_PLUGINS) gets its
  recipe keys and overrides with no edit to `vsgd_dist.config`;
- its range checks (run by `RunConfig.check`, so a bad value fails in the launcher);
- its builder, given a `TransformContext`;
- its place in `launch compare`: the label it adds to a run's name, its table columns and the
  extra compute it logs.

The trainer knows no transform by name. It builds those that are on and calls the hooks of
`GradientTransform`, in registry order:

    before_steps(step, epoch)                 with no train loader open: at the start of the run
                                              or a resume, at every epoch start, and when the
                                              count the last call returned has run out
    before_step(step, epoch, micro_batches)   before each step's forward/backward
    apply(grads)                              the engine: this rank's averaged gradient
                                              (`Engine.reduced_grads()`), after the reduction,
                                              before clipping and the step
    log_values()                              at every log step, on every rank
    state_dict() / load_state_dict(...)       with each checkpoint / at a resume
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from vsgd_dist.registry import Registry


@dataclass(frozen=True)
class TransformContext:
    """What the trainer offers a transform when it builds it: the run's shape and two services."""

    engine: Any
    """The engine: `reduced_grads()`, `local_weights()`, `weights_swapped()`, `zero_grad()`,
    `model`, `sharded_grads` and `shard_group` (sums over a sharded gradient add up there)."""
    total_steps: int
    """Optimizer steps in the run."""
    steps_per_epoch: int
    """Optimizer steps per epoch; step s is step s % steps_per_epoch of epoch s // steps_per_epoch."""
    log_every: int
    """Steps between logs (`log_values` is called after step s when s % log_every == 0 and
    after the last step)."""
    seed: int
    """The run's seed (train.seed)."""
    gradient: Callable[[list], list[torch.Tensor]]
    """gradient(micro_batches): forward/backward of one step's micro-batches at the weights
    the model holds, reduced by the engine as a step's would be; returns `engine.reduced_grads()`
    (valid until `engine.zero_grad()`)."""
    read_steps: Callable[[int, int, int], Iterator[list]]
    """read_steps(epoch, first, count): steps first, first + 1, ... of `epoch` (at most `count`,
    never past the epoch's end) read from the train loader, each a list of micro-batches: the
    images, crops, flips and mixes training gets at those steps (the loader's draws are keyed
    by seed, epoch and sample). Only inside `before_steps`, when no train loader is open."""


class GradientTransform:
    """The hooks the trainer calls (see the module docstring); every one but `apply` has a
    do-nothing default."""

    name: str = ""
    """Its registry name: the recipe section, and the prefix of its checkpoint and log keys."""

    def before_steps(self, step: int, epoch: int) -> int:
        """Work that reads training data itself (`TransformContext.read_steps`) goes here.
        Returns how many steps may run before it is called again (it is called at the next
        epoch start in any case)."""
        return 2**62

    def before_step(self, step: int, epoch: int, micro_batches: list) -> None:
        """Before the forward/backward of `step` on `micro_batches`."""

    def apply(self, grads: list[torch.Tensor]) -> None:
        """Edit this rank's averaged gradient in place (the engine calls it; with a sampling
        optimizer once per weight sample)."""
        raise NotImplementedError

    def log_values(self) -> dict[str, float]:
        """Scalars to log, keyed "<name>/<what>"; called on every rank (it may reduce over ranks)."""
        return {}

    def state_dict(self) -> tuple[dict, dict[str, list[torch.Tensor]]]:
        """(plain values, {key: tensors laid out like `Engine.reduced_grads()`}) for checkpoints:
        the tensors go through the engine, so they reshard to any world size and engine."""
        return {}, {}

    def load_state_dict(self, values: dict | None, tensors: dict[str, list[torch.Tensor]], step: int) -> None:
        """Resume at `step` from `state_dict()`'s parts (values None: nothing was saved)."""


@dataclass(frozen=True)
class ReportColumn:
    """A column of `launch compare`'s table: the final logged value of `tag`, times `scale`."""

    header: str
    tag: str
    scale: float = 1.0
    format: str = ".4g"


@dataclass(frozen=True)
class TransformEntry:
    config: type
    """Dataclass of its recipe section `RunConfig.<name>` (one docstring per field)."""
    enabled: Callable[[Any], bool]
    """section -> whether the run uses it (off: nothing is built, training is as without it)."""
    check: Callable[[Any, Any], None]
    """(section, RunConfig) -> raise ValueError with a one-line message naming the fix."""
    build: Callable[[Any, TransformContext], GradientTransform]
    """(section, context) -> the transform."""
    label: Callable[[Any], str]
    """section -> what a run that uses it adds to its optimizer's name in reports
    ("alpha-SVRG 0.75" makes "vsgd + alpha-SVRG 0.75")."""
    columns: tuple[ReportColumn, ...] = ()
    """Its columns in `launch compare`'s table (shown when a compared run logged the tag)."""
    extra_steps_tag: str = ""
    """The tag of the forward/backward passes it ran beyond training's own so far, in steps'
    worth (cumulative): reports read the runs at equal compute with it ("" : none)."""

    def section(self, values: dict | None):
        """Its recipe section from a saved recipe's dict (keys it no longer has are dropped)."""
        known = {f.name for f in dataclasses.fields(self.config)}
        return self.config(**{k: v for k, v in (values or {}).items() if k in known})


GRADIENT_TRANSFORMS: Registry[TransformEntry] = Registry("gradient transform")


def build_transforms(cfg, context: TransformContext) -> list[GradientTransform]:
    """The transforms `cfg` (a RunConfig) turns on, in registry order."""
    built = []
    for name, entry in GRADIENT_TRANSFORMS.items():
        section = getattr(cfg, name)
        if entry.enabled(section):
            transform = entry.build(section, context)
            transform.name = name
            built.append(transform)
    return built
