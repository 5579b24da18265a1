"""alpha-SVRG: variance-reduced gradients for any optimizer, as a gradient transform.

From "A Coefficient Makes SVRG Effective" (Yin, Xu, Hu, Gao, Liu, arXiv 2311.05589, ICLR
2025), written from its description; docs/alpha-svrg.md says what each key does, how the keys
map to the authors' flags and where this differs. Each snapshot interval starts with a
snapshot of the weights, theta~, and a pass over the whole epoch's batches at theta~ whose mean
gradient is the full gradient F(theta~). Each step t of the interval then hands the optimizer

    g_t = g_B(theta_t) - alpha * (g_B(theta~) - F(theta~))

instead of the minibatch gradient g_B(theta_t), with alpha = linspace(alpha0, 0, number of
snapshots in the run)[snapshot index], constant within an interval and 0 from `svrg.end_epoch`
on. The intervals are `svrg.snapshot_every` steps (one epoch by default), restarting at every
epoch start (`svrg.intervals=epoch`, as the authors do) or counted across the run.

Where it runs: the engine calls `apply` on this rank's averaged gradient
(`Engine.reduced_grads()`: after DDP's all-reduce, after ZeRO's or FSDP2's reduce-scatter,
this rank's shard), before clipping and the step. Everything it keeps (theta~, F(theta~),
the cached gradients) is laid out like that gradient, so under ZeRO-2 and FSDP2 each rank
keeps 1/N of it and the correction needs no communication beyond the snapshot model's own
reduction. Gradients at theta~ are computed by the same engine with the snapshot swapped in
(`vsgd_dist.engines.ownership.weights_swapped`), so they are reduced exactly like the step's own.

The batches: the pass reads the epoch's steps from the train loader (`read_steps`), whose
draws are keyed by (seed, epoch, sample index), so it sees the images, crops and flips
training sees. The random draws of the model's own forward (dropout) are keyed by
(seed, step, rank): the RNG is seeded with that key before each step's forward, before the
snapshot's forward on the step's batch (vanilla) and before the pass's forward on it, so all
three draw the same masks, in either mode. BatchNorm's running statistics are put back after
every pass at the snapshot unless `svrg.pass_updates_running_stats`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from vsgd_dist.distributed import all_reduce, rank_and_world
from vsgd_dist.engines.ownership import local_weights, weights_swapped
from vsgd_dist.registry import suggest
from vsgd_dist.transforms.registry import (GRADIENT_TRANSFORMS, GradientTransform, ReportColumn, TransformContext,
                                           TransformEntry)

MODES = ("vanilla", "cached")
INTERVALS = ("epoch", "run")
ENGINES = ("zero", "ddp", "fsdp2")
"""Engines whose averaged gradient `Engine.reduced_grads()` exposes before the step."""


@dataclass
class SVRGConfig:
    alpha0: float = 0.0
    """alpha-SVRG's coefficient at the first snapshot, decaying linearly to 0 at the last one
    (linspace(alpha0, 0, number of snapshots in the run)); 0 turns alpha-SVRG off (the paper
    uses 0.75; 1 with no decay would be classic SVRG). The authors' --coefficient."""
    snapshot_every: int = 0
    """Steps between snapshots (0: one epoch, as in the paper; the authors'
    --snapshot_pass_freq). Each snapshot takes a pass over the whole epoch's batches for the
    full gradient, whatever the interval."""
    intervals: str = "epoch"
    """How the snapshot intervals fall. epoch (the authors'): they restart at every epoch
    start, so an epoch of S steps has ceil(S / snapshot_every) snapshots, the last interval
    possibly shorter, and snapshot_every >= S means one per epoch. run: every snapshot_every
    steps counted from the run's start, across epoch ends (a snapshot every few epochs)."""
    end_epoch: int = 0
    """From this epoch on (epochs counted from 0) the coefficient is 0: no more snapshots or
    extra passes (0: never, the whole run). The authors keep the correction while
    epoch <= --svrg_end, so their svrg_end = N is end_epoch = N + 1."""
    mode: str = "vanilla"
    """How a step gets the snapshot's gradient on its batch. vanilla: one more forward/backward
    of the snapshot each step (about 2x the compute of a step, plus the pass; memory: the
    snapshot and the full gradient, 2 gradients' worth per rank, 1/N of the model under zero and
    fsdp2). cached: the pass keeps the gradients of the interval's steps and the steps reuse
    them (no extra forward/backward per step; memory: the interval's steps x 1 gradient per
    rank). Both give the same gradients."""
    pass_updates_running_stats: bool = False
    """Whether the pass at each snapshot updates BatchNorm's running statistics, as the
    authors' code does (its pass runs the training model). false: they are put back after it,
    so they describe the weights training evaluates (the pass sees the snapshot's weights)."""


def check(cfg: SVRGConfig, run) -> None:
    """The recipe's `svrg` section with the rest of the recipe; one-line errors naming the fix."""
    if not (math.isfinite(cfg.alpha0) and 0.0 <= cfg.alpha0 <= 1.0):
        raise ValueError(f"svrg.alpha0={cfg.alpha0} must be in [0, 1] (0 turns alpha-SVRG off; the paper uses 0.75)")
    if cfg.mode not in MODES:
        raise ValueError(f"svrg.mode={cfg.mode!r} is not one of {', '.join(MODES)}{suggest(cfg.mode, MODES)}")
    if cfg.intervals not in INTERVALS:
        raise ValueError(f"svrg.intervals={cfg.intervals!r} is not one of {', '.join(INTERVALS)}"
                         f"{suggest(cfg.intervals, INTERVALS)}")
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
    """alpha-SVRG on one engine (see the module docstring)."""

    def __init__(self, cfg: SVRGConfig, context: TransformContext):
        self.cfg, self.context, self.engine = cfg, context, context.engine
        self.steps_per_epoch, self.total_steps = context.steps_per_epoch, context.total_steps
        self.every = cfg.snapshot_every or context.steps_per_epoch
        self.rank = rank_and_world()[0]
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
    def interval_of(self, step: int) -> tuple[int, int]:
        """(index, end step) of the snapshot interval that holds `step`."""
        if self.cfg.intervals == "run":
            index = step // self.every
            return index, min((index + 1) * self.every, self.total_steps)
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        part = in_epoch // self.every
        end = min(epoch * self.steps_per_epoch + min((part + 1) * self.every, self.steps_per_epoch), self.total_steps)
        return epoch * self._per_epoch(self.steps_per_epoch) + part, end

    def _per_epoch(self, steps: int) -> int:
        return -(-steps // self.every)

    @property
    def snapshots(self) -> int:
        """Snapshot intervals in the run: the points linspace(alpha0, 0, .) has."""
        if self.cfg.intervals == "run":
            return -(-self.total_steps // self.every)
        epochs, rest = divmod(self.total_steps, self.steps_per_epoch)
        return epochs * self._per_epoch(self.steps_per_epoch) + self._per_epoch(rest)

    def coefficient(self, interval: int) -> float:
        """linspace(alpha0, 0, number of snapshots)[interval]."""
        if self.snapshots <= 1:
            return float(self.cfg.alpha0)
        return float(np.linspace(self.cfg.alpha0, 0.0, self.snapshots)[min(interval, self.snapshots - 1)])

    def _ended(self, epoch: int) -> bool:
        return self.cfg.end_epoch > 0 and epoch >= self.cfg.end_epoch

    def step_seed(self, step: int) -> int:
        """The seed of step `step`'s random draws on this rank: (train.seed, step, rank)."""
        return int(np.random.SeedSequence([self.context.seed, step, self.rank]).generate_state(1)[0])

    # ---- the hooks ---------------------------------------------------------------------------
    def before_steps(self, step, epoch):
        """At the first step of an interval (or of a resume that holds no snapshot): the
        snapshot and its pass."""
        interval, end = self.interval_of(step)
        if interval != self.interval:
            self._take_snapshot(interval, step, end, epoch)
        return end - step

    def _steps(self, first: int, count: int):
        """(step, micro-batches) for `count` steps from `first`, across epoch ends."""
        while count > 0:
            epoch, in_epoch = divmod(first, self.steps_per_epoch)
            take = min(count, self.steps_per_epoch - in_epoch)
            for offset, micro_batches in enumerate(self.context.read_steps(epoch, in_epoch, take)):
                yield first + offset, micro_batches
            first, count = first + take, count - take

    def _take_snapshot(self, interval: int, step: int, end: int, epoch: int) -> None:
        """theta~ = the weights now; F(theta~) = the mean gradient at theta~ over the epoch's
        steps; kept: the gradients of the steps this mode takes from the pass."""
        self.interval, self.alpha = interval, 0.0 if self._ended(epoch) else self.coefficient(interval)
        self.snapshot = self.full_grad = None
        self.cache = {}
        if self._ended(epoch) or self.alpha == 0 and not self.cfg.pass_updates_running_stats:
            return  # no correction this interval: no pass either (the authors' pass at alpha 0 only moves BN stats)
        keep = set(range(step, end)) if self.cfg.mode == "cached" else {step}
        epoch_start, epoch_end = epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch
        snapshot = [w.clone() for w in local_weights(self.engine.ownership())]
        total, squares, count = None, None, 0
        keep_stats = not self.cfg.pass_updates_running_stats
        with weights_swapped(self.engine.ownership(), snapshot), isolated(self.engine.model, keep_stats):
            for s, micro_batches in self._steps(epoch_start, self.steps_per_epoch):
                grads = self._gradient_at(s, micro_batches)
                with torch.no_grad():
                    if total is None:
                        total = [g.clone() for g in grads]
                    else:
                        torch._foreach_add_(total, grads)
                    squares = squared_norm(grads) + (0 if squares is None else squares)
                    if s in keep:
                        self.cache[s] = [g.clone() for g in grads]
                self.engine.zero_grad()
                count += 1
            if self.cfg.mode == "cached":  # intervals=run: the interval's steps past the epoch, not in F
                for s, micro_batches in self._steps(epoch_end, end - epoch_end):
                    self.cache[s] = [g.clone() for g in self._gradient_at(s, micro_batches)]
                    self.engine.zero_grad()
                    self.extra_steps += 1
        self.extra_steps += count
        torch._foreach_div_(total, count)
        self.full_grad = total
        self.snapshot = snapshot if self.cfg.mode == "vanilla" else None
        # Variance of the pass's minibatch gradients around their mean: mean ||g_j||^2 - ||F||^2.
        self._snapshot_variance = squares / count - squared_norm(total)

    def _gradient_at(self, step: int, micro_batches: list) -> list[torch.Tensor]:
        """The gradient of `step`'s batch at the weights the model holds, with that step's draws."""
        torch.manual_seed(self.step_seed(step))
        return self.context.gradient(micro_batches)

    def before_step(self, step, epoch, micro_batches):
        """This step's g_B(theta~) - F(theta~): from the cache, or (vanilla) a forward/backward
        of the snapshot on `micro_batches`; then the RNG is seeded with the step's key, so the
        step's own forward draws what the snapshot's did."""
        self._alpha_step = 0.0 if self.full_grad is None or self._ended(epoch) else self.alpha
        self._measure = (step + 1) % self.context.log_every == 0 or step + 1 == self.total_steps
        self._diff = None
        snapshot_grad = self.cache.pop(step, None)
        if self._alpha_step:
            if snapshot_grad is None:
                with weights_swapped(self.engine.ownership(), self.snapshot), isolated(self.engine.model, True):
                    snapshot_grad = [g.clone() for g in self._gradient_at(step, micro_batches)]
                    self.engine.zero_grad()
                self.extra_steps += 1
            torch._foreach_sub_(snapshot_grad, self.full_grad)
            self._diff = snapshot_grad
        torch.manual_seed(self.step_seed(step))

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
        over a step's batch it ran so far: the passes and, in vanilla mode, the snapshot's per
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
        """Continue the saved interval; saved at its end (or with other intervals), the next
        `before_steps` starts a new one. What this mode needs but the checkpoint lacks (a cached
        run resumed as vanilla has no snapshot) also makes `before_steps` take a snapshot here."""
        if values is None:
            return
        self.extra_steps = int(values.get("extra_steps", 0))
        interval, end = self.interval_of(step)
        if values["interval"] != interval:
            return
        self.interval, self.alpha = interval, float(values["alpha"])
        self.full_grad, self.snapshot = tensors.get("full_grad"), tensors.get("snapshot")
        self.cache = {int(key.split(".", 1)[1]): grads for key, grads in tensors.items() if key.startswith("cache.")}
        if self.full_grad is not None and self.snapshot is None and any(s not in self.cache for s in range(step, end)):
            self.interval = -1


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum of squares of every element, in float64 (a 0-d tensor on the tensors' device)."""
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


@contextlib.contextmanager
def isolated(model: torch.nn.Module, keep_running_stats: bool):
    """The RNG state after is the state before (forked); with `keep_running_stats`, BatchNorm's
    running statistics (the model's buffers) are put back too."""
    buffers = [b.detach().clone() for b in model.buffers()] if keep_running_stats else []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)


def label(cfg: SVRGConfig) -> str:
    """"alpha-SVRG 0.75", with the mode when cached and the intervals when counted over the run."""
    details = [x for x in (cfg.mode if cfg.mode != "vanilla" else "",
                           "intervals over the run" if cfg.intervals == "run" else "") if x]
    return f"alpha-SVRG {cfg.alpha0:g}" + (f" ({', '.join(details)})" if details else "")


GRADIENT_TRANSFORMS.register("svrg", TransformEntry(
    config=SVRGConfig, enabled=lambda cfg: cfg.alpha0 > 0, check=check, build=AlphaSVRG, label=label,
    columns=(ReportColumn("alpha-SVRG extra passes (steps)", "svrg/extra_steps", 1, ".0f"),),
    extra_steps_tag="svrg/extra_steps"))
