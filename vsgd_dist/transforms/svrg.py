"""alpha-SVRG: variance-reduced gradients for any optimizer, as a gradient transform.

From "A Coefficient Makes SVRG Effective" (Yin, Xu, Hu, Gao, Liu, arXiv 2311.05589, ICLR
2025), written from its description (`../shared/docs/alpha-svrg-spec.md`). Every snapshot
interval (`svrg.snapshot_every` steps, one epoch by default) starts with a snapshot of the
weights, theta~, and a pass over that interval's batches at theta~ whose mean gradient is the
full gradient F(theta~). Each step t of the interval then hands the optimizer

    g_t = g_B(theta_t) - alpha * (g_B(theta~) - F(theta~))

instead of the minibatch gradient g_B(theta_t), with alpha = linspace(alpha0, 0, number of
snapshots)[snapshot index], constant within an interval and 0 from `svrg.end_epoch` on.

Where it runs: the engine calls `apply` on this rank's averaged gradient
(`Engine.reduced_grads()`: after DDP's all-reduce, after ZeRO's or FSDP2's reduce-scatter,
this rank's shard), before clipping and the step. Everything it keeps (theta~, F(theta~),
the cached gradients) is laid out like that gradient, so under ZeRO-2 and FSDP2 each rank
keeps 1/N of it and the correction needs no communication beyond the snapshot model's own
reduction. Gradients at theta~ are computed by the same engine with the snapshot swapped in
(`vsgd_dist.engines.ownership.weights_swapped`: under ZeRO an all-gather of the sharded snapshot, and one of the
weights back), so they are reduced exactly like the step's own.

The batches: the pass reads the interval's steps from the train loader before training
reads them, and the loader's draws are keyed by (seed, epoch, sample index), so the pass
sees the images, crops and flips training will see. `vanilla` runs the snapshot model on
each step's own batch tensor (the same tensor; the RNG is forked, so a dropout draws the same
masks in both forwards); `cached` keeps the pass's gradient of each step and reuses it.
BatchNorm's running statistics and the RNG are put back after every pass at the snapshot,
so the extra passes leave no trace on training apart from the gradient they correct.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from vsgd_dist.distributed import all_reduce
from vsgd_dist.engines.ownership import local_weights, weights_swapped
from vsgd_dist.registry import suggest
from vsgd_dist.transforms.registry import GRADIENT_TRANSFORMS, GradientTransform, TransformEntry

MODES = ("vanilla", "cached")
ENGINES = ("zero", "ddp", "fsdp2")
"""Engines whose averaged gradient `Engine.reduced_grads()` exposes before the step."""


@dataclass
class SVRGConfig:
    alpha0: float = 0.0
    """alpha-SVRG's coefficient at the first snapshot, decaying linearly to 0 at the last one
    (linspace(alpha0, 0, number of snapshots)); 0 turns alpha-SVRG off (the paper uses 0.75;
    1 with no decay would be classic SVRG)."""
    snapshot_every: int = 0
    """Steps between snapshots; each starts with a pass over that interval's batches at the
    snapshot for the full gradient (0: one epoch, as in the paper)."""
    end_epoch: int = 0
    """From this epoch on the coefficient is 0: no more snapshots or extra passes (0: never,
    the whole run)."""
    mode: str = "vanilla"
    """How a step gets the snapshot's gradient on its batch. vanilla: one more forward/backward
    of the snapshot each step (about 2x the compute of a step, plus the pass; memory: the
    snapshot and the full gradient, 2 gradients' worth per rank, 1/N of the model under zero and
    fsdp2). cached: the pass keeps each step's gradient and the step reuses it (no extra
    forward/backward per step, but memory grows with the interval: steps x 1 gradient per rank)."""


def check(cfg: SVRGConfig, run) -> None:
    """The recipe's `svrg` section with the rest of the recipe; one-line errors naming the fix."""
    if not (math.isfinite(cfg.alpha0) and 0.0 <= cfg.alpha0 <= 1.0):
        raise ValueError(f"svrg.alpha0={cfg.alpha0} must be in [0, 1] (0 turns alpha-SVRG off; the paper uses 0.75)")
    if cfg.mode not in MODES:
        raise ValueError(f"svrg.mode={cfg.mode!r} is not one of {', '.join(MODES)}{suggest(cfg.mode, MODES)}")
    if cfg.snapshot_every < 0:
        raise ValueError(f"svrg.snapshot_every={cfg.snapshot_every} must be >= 0 (0: one snapshot per epoch)")
    if cfg.end_epoch < 0:
        raise ValueError(f"svrg.end_epoch={cfg.end_epoch} must be >= 0 (0: alpha-SVRG for the whole run)")
    if cfg.alpha0 > 0 and run.engine.name not in ENGINES:
        raise ValueError(f"svrg.alpha0={cfg.alpha0} (alpha-SVRG) runs on the engines {', '.join(ENGINES)}, not "
                         f"engine.name={run.engine.name}: DeepSpeed averages, clips and steps the gradient inside "
                         f"its own step, leaving no place for the correction; use engine=zero (the same ZeRO-2 "
                         f"sharding) or svrg.alpha0=0")


class AlphaSVRG(GradientTransform):
    """alpha-SVRG on one engine; `gradient(micro_batches)` runs forward/backward at the weights
    the model holds and returns `engine.reduced_grads()`."""

    def __init__(self, cfg: SVRGConfig, *, engine, gradient, total_steps: int, steps_per_epoch: int,
                 log_every: int):
        self.cfg, self.engine, self.gradient = cfg, engine, gradient
        self.every = cfg.snapshot_every or steps_per_epoch
        self.snapshots = -(-total_steps // self.every)
        self.total_steps, self.log_every = total_steps, log_every
        self.interval = -1  # the interval whose snapshot is held (-1: none yet)
        self.alpha = 0.0  # that interval's coefficient
        self.snapshot: list[torch.Tensor] | None = None  # theta~ (vanilla mode only)
        self.full_grad: list[torch.Tensor] | None = None  # F(theta~); None: alpha is 0
        self.cache: dict[int, list[torch.Tensor]] = {}  # step -> g_B(theta~) of its batch, from the pass
        self._diff: list[torch.Tensor] | None = None  # this step's g_B(theta~) - F(theta~)
        self._alpha_step = 0.0  # this step's coefficient
        self._measure = False  # whether this step is logged (then its variances are measured)
        self._variance: torch.Tensor | None = None
        self._snapshot_variance: torch.Tensor | None = None
        self.extra_steps = 0  # forward/backward passes over a step's batch beyond training's own, so far

    # ---- the schedule ----------------------------------------------------------------------
    def coefficient(self, interval: int) -> float:
        """linspace(alpha0, 0, number of snapshots)[interval]."""
        if self.snapshots <= 1:
            return float(self.cfg.alpha0)
        return float(np.linspace(self.cfg.alpha0, 0.0, self.snapshots)[min(interval, self.snapshots - 1)])

    def _ended(self, epoch: int) -> bool:
        return self.cfg.end_epoch > 0 and epoch >= self.cfg.end_epoch

    def _interval_end(self, interval: int) -> int:
        return min((interval + 1) * self.every, self.total_steps)

    # ---- the trainer's calls ---------------------------------------------------------------
    def prepare(self, step, epoch, steps_ahead):
        """At the first step of an interval (or of a resume that holds no snapshot): the
        snapshot and its pass over the interval's (remaining) batches."""
        interval = step // self.every
        end = self._interval_end(interval)
        if interval != self.interval:
            self._take_snapshot(interval, step, end, epoch, steps_ahead)
        return end - step

    def _take_snapshot(self, interval: int, step: int, end: int, epoch: int, steps_ahead) -> None:
        self.interval, self.alpha = interval, 0.0 if self._ended(epoch) else self.coefficient(interval)
        self.snapshot = self.full_grad = None
        self.cache = {}
        if self.alpha == 0:
            return  # no correction this interval: no pass either
        snapshot = [w.clone() for w in local_weights(self.engine.ownership())]
        total, squares, count = None, None, 0
        with weights_swapped(self.engine.ownership(), snapshot), isolated(self.engine.model):
            for offset, micro_batches in enumerate(steps_ahead(end - step)):
                grads = self.gradient(micro_batches)
                with torch.no_grad():
                    if total is None:
                        total = [g.clone() for g in grads]
                    else:
                        torch._foreach_add_(total, grads)
                    squares = squared_norm(grads) + (0 if squares is None else squares)
                    if self.cfg.mode == "cached" or offset == 0:  # vanilla: the first step's is this one too
                        self.cache[step + offset] = [g.clone() for g in grads]
                self.engine.zero_grad()
                count += 1
        self.extra_steps += count
        torch._foreach_div_(total, count)
        self.full_grad = total
        self.snapshot = snapshot if self.cfg.mode == "vanilla" else None
        # Variance of the pass's minibatch gradients around their mean: mean ||g_j||^2 - ||F||^2.
        self._snapshot_variance = squares / count - squared_norm(total)

    def before_step(self, step, epoch, micro_batches):
        """This step's g_B(theta~) - F(theta~): from the cache, or (vanilla) a forward/backward
        of the snapshot on `micro_batches` with the RNG forked, so the step's own forward draws
        the same random numbers."""
        self._alpha_step = 0.0 if self.full_grad is None or self._ended(epoch) else self.alpha
        self._measure = (step + 1) % self.log_every == 0 or step + 1 == self.total_steps
        self._diff = None
        snapshot_grad = self.cache.pop(step, None)
        if not self._alpha_step:
            return
        if snapshot_grad is None:
            with weights_swapped(self.engine.ownership(), self.snapshot), isolated(self.engine.model):
                snapshot_grad = [g.clone() for g in self.gradient(micro_batches)]
                self.engine.zero_grad()
            self.extra_steps += 1
        torch._foreach_sub_(snapshot_grad, self.full_grad)
        self._diff = snapshot_grad

    @torch.no_grad()
    def apply(self, grads):
        """g <- g - alpha (g_B(theta~) - F(theta~)) on this rank's averaged gradient; at a log step
        also the squared distances to F(theta~) before and after."""
        if self._diff is None:
            return
        before = self._distance(grads) if self._measure else None
        torch._foreach_add_(grads, self._diff, alpha=-self._alpha_step)
        if before is not None:
            self._variance = torch.stack([before, self._distance(grads)])

    def _distance(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return squared_norm(torch._foreach_sub(grads, self.full_grad))

    def log_values(self):
        """svrg/alpha (this step's coefficient); after a correction was measured,
        svrg/grad_var (||g_B(theta_t) - F(theta~)||^2, the minibatch gradient's squared distance
        to the snapshot's full gradient, summed over all weights) and svrg/grad_var_corrected
        (the same for the corrected gradient); after a pass, svrg/grad_var_snapshot (the
        variance of the pass's minibatch gradients around F(theta~)); svrg/state_mib (this
        rank's snapshot, full gradient and cache); svrg/extra_steps (forward/backward passes
        over a step's batch it ran so far: the pass and, in vanilla mode, the snapshot's per
        step; the compute of step s is s + extra_steps steps' worth)."""
        values = {"svrg/alpha": self._alpha_step, "svrg/state_mib": self.state_bytes() / 2**20,
                  "svrg/extra_steps": float(self.extra_steps)}
        names, pending = [], []
        if self._variance is not None:
            names += ["svrg/grad_var", "svrg/grad_var_corrected"]
            pending.append(self._variance)
        if self._snapshot_variance is not None:
            names.append("svrg/grad_var_snapshot")
            pending.append(self._snapshot_variance.reshape(1))
        if pending:
            summed = torch.cat(pending)
            own = self.engine.ownership()
            if own.sharded_grads:
                summed = all_reduce(summed, process_group=own.shard_group)
            values.update(zip(names, summed.tolist()))
        self._variance = self._snapshot_variance = None
        return values

    def state_bytes(self) -> int:
        held = [*(self.snapshot or []), *(self.full_grad or []), *(g for gs in self.cache.values() for g in gs)]
        return sum(t.nbytes for t in held)

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        values = {"interval": self.interval, "alpha": self.alpha, "extra_steps": self.extra_steps}
        tensors = {}
        if self.full_grad is not None:
            tensors["full_grad"] = self.full_grad
            if self.snapshot is not None:
                tensors["snapshot"] = self.snapshot
            tensors.update({f"cache.{step}": grads for step, grads in self.cache.items()})
        return values, tensors

    def load_state_dict(self, values, tensors, step):
        """Continue the saved interval; saved at its end (or with another snapshot_every), the
        next `prepare` starts a new one. What this mode needs but the checkpoint lacks (a cached
        run resumed as vanilla has no snapshot) also makes `prepare` take a snapshot here."""
        if values is None:
            return
        self.extra_steps = int(values.get("extra_steps", 0))
        if values["interval"] != step // self.every:
            return
        self.interval, self.alpha = int(values["interval"]), float(values["alpha"])
        self.full_grad, self.snapshot = tensors.get("full_grad"), tensors.get("snapshot")
        self.cache = {int(key.split(".", 1)[1]): grads for key, grads in tensors.items() if key.startswith("cache.")}
        needed = range(step, self._interval_end(self.interval))
        if self.full_grad is not None and self.snapshot is None and any(s not in self.cache for s in needed):
            self.interval = -1


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum of squares of every element, in float64 (a 0-d tensor on the tensors' device)."""
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


@contextlib.contextmanager
def isolated(model: torch.nn.Module):
    """Forward/backward passes inside leave no trace: BatchNorm's running statistics are put
    back, and the RNG state after is the state before (forked)."""
    buffers = [b.detach().clone() for b in model.buffers()]
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)


GRADIENT_TRANSFORMS.register("svrg", TransformEntry(config=SVRGConfig, enabled=lambda cfg: cfg.alpha0 > 0,
                                                    check=check, build=AlphaSVRG))
