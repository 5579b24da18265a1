"""The training loop, read top to bottom: `Trainer(cfg, run_dir).run()`.

Every launcher calls this (local processes, submitit on SLURM, the sbatch template). The
process group comes from the environment; the engine (DDP / native ZeRO / FSDP2 /
DeepSpeed), the optimizer and the model are registry choices and the loop never branches
on them. `_train` is the loop; each named piece below it does one job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from vsgd_dist.config import RunConfig, config_from_dict
from vsgd_dist.data import build_train_loader, build_val_loader, resolve_dataset, train_epoch
from vsgd_dist.data.mixup import BatchMixer
from vsgd_dist.data.schedule import resolution_at_epoch
from vsgd_dist.distributed import (all_reduce, close_process_group, configure_device, init_process_group_from_env,
                                   pick_device, rank_and_world, reduce_host_values)
from vsgd_dist.engines import build_engine, sync_buffers
from vsgd_dist.engines.ownership import state_bytes, state_pieces
from vsgd_dist.engines.sampling import WeightSampling
from vsgd_dist.metrics import RunLogger, StepTimer, memory_stats
from vsgd_dist.models import build_model, layer_group
from vsgd_dist.models.drop_path import drop_path_draws
from vsgd_dist.optim import OPTIMIZERS
from vsgd_dist.optim.diagnostics import reduced_diagnostics
from vsgd_dist.train.checkpoint import Checkpointer, open_run_dir
from vsgd_dist.train.ema import WeightEMA
from vsgd_dist.train.engine_setup import engine_setup
from vsgd_dist.train.predictions import SUMS_SIZE, metrics_from_sums, prediction_sums
from vsgd_dist.train.schedule import lr_lambda
from vsgd_dist.train.state import capture_rng, restore_rng
from vsgd_dist.transforms import TransformContext, build_transforms


MIN_LOG_POINTS = 8
"""Train scalars are logged at least this often over a run (train.log_every is shortened)."""
FINISHED = "finished.json"
"""Rank 0 writes {"step", "result"} here once the final validation is logged."""


class Trainer:
    """Trains `cfg` into `run_dir`, resuming from the latest checkpoint found there."""

    def __init__(self, cfg: RunConfig | dict, run_dir: str | None = None):
        self.cfg = cfg if isinstance(cfg, RunConfig) else config_from_dict(cfg)
        self.run_dir = Path(run_dir or self.cfg.train.out)
        self._stop_requested = threading.Event()

    def request_stop(self) -> None:
        """Thread-safe: save a checkpoint at the next agreed step boundary and return (preemption)."""
        self._stop_requested.set()

    def run(self) -> dict:
        owns_group = init_process_group_from_env()
        summary = self._train()
        # Closed only after success: after an error on this rank (a full disk while saving),
        # the others wait in a collective this rank never joins, and the closing barrier would
        # hang it and hide the error; the launcher ends the other ranks instead.
        if owns_group:
            close_process_group()
        return summary

    # ------------------------------------------------------------------------- the loop
    def _train(self) -> dict:
        tc = self.cfg.train
        self._setup()
        self._resume()
        if self.finished is not None:  # the same command again after the run completed
            self.progress.close()
            return {"status": "completed", "step": self.step, **self.finished}
        status, result, stopped_by = "completed", {}, {}
        while status == "completed" and self.step < self.total_steps:
            for micro_batches in self._batches_of_epoch():
                self._train_step(micro_batches)
                if self.step % self.log_every == 0 or self.step == self.total_steps:
                    self._log_train()
                if self.log_diagnostics and (self.step % tc.diag_every == 0 or self.step == self.total_steps):
                    self._log_diagnostics()
                if self.step == tc.stop_at or self._stop_agreed():
                    # stop_at ends the run as asked; a stop request (a signal) expects a requeue
                    status, stopped_by = "stopped", {"stopped_by": "stop_at" if self.step == tc.stop_at else "signal"}
                    break
                if self._checkpoint_due() and self.batch_in_epoch < self.steps_per_epoch:
                    self._save()
            else:
                result = self._end_epoch() or result
                if self._checkpoint_due() and self.batch_in_epoch == 0:
                    # An epoch's last step saves after the epoch's validation, which a resume
                    # from that checkpoint would otherwise run and log a second time.
                    self._save()
        self.progress.close()
        self._save()  # at max_steps, at stop_at, or on a stop request: the resume point
        self.checkpointer.wait()  # a background save is published before the run ends
        if status == "completed":
            result = self._validate()
            self._log_hparams(result)
        self.logger.close()
        if status == "completed" and self.rank == 0:
            write_atomically(self.run_dir / FINISHED, json.dumps({"step": self.step, "result": result}))
        return {"status": status, "step": self.step, **stopped_by, **result}

    def _finished_result(self) -> dict | None:
        """The final validation's result if the run already completed at this step (its last
        checkpoint is at the last step and rank 0 recorded the validation after it), else None."""
        path = self.run_dir / FINISHED
        if self.step != self.total_steps or not path.exists():
            return None
        finished = json.loads(path.read_text())
        if finished["step"] != self.step:
            return None
        if self.rank == 0:
            print(f"trainer: the run completed at step {self.step} already ({path}); nothing to train or log",
                  file=sys.stderr, flush=True)
        return finished["result"]

    # ------------------------------------------------------------------------ the pieces
    def _setup(self) -> None:
        """Data, model, engine (wrapper + optimizer), LR schedule, EMA, step timer."""
        cfg, tc = self.cfg, self.cfg.train
        self.rank, self.world = rank_and_world()
        self.device = pick_device()
        cfg.check(self.world)
        open_run_dir(self.run_dir, cfg, self.rank)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank

        # Each rank reads global_batch / world_size images per step, in accum_steps micro-batches.
        self.batch_per_rank = tc.global_batch // (self.world * tc.accum_steps)
        manifest = resolve_dataset(cfg.data).manifest
        self.classes = manifest.classes
        # CUDA kernel options (train.fast_kernels) and this rank's CPU threads: the loader's
        # decoding threads and torch's share of the cores a rank has (cpus per task).
        data = dataclasses.replace(cfg.data, num_workers=configure_device(
            self.device, tc.fast_kernels, cfg.data.num_workers))
        self.train_loader = build_train_loader(data, self.device, batch_size=self.batch_per_rank,
                                               seed=tc.seed, distributed=self.world > 1)
        self.val_loader = build_val_loader(data, self.device, batch_size=self.batch_per_rank,
                                           distributed=self.world > 1)
        # data.minival: train images held out for tuning, evaluated next to val
        self.minival_loader = build_val_loader(data, self.device, batch_size=self.batch_per_rank,
                                               distributed=self.world > 1, minival=True) if data.minival else None
        self.steps_per_epoch = len(self.train_loader) // tc.accum_steps
        self.total_steps = tc.max_steps or tc.epochs * self.steps_per_epoch
        # a short run still draws curves: at least MIN_LOG_POINTS logs of train scalars
        self.log_every = min(tc.log_every, max(1, self.total_steps // MIN_LOG_POINTS))

        model = build_model(cfg.model.name, len(self.classes), image_size=cfg.data.end_res,
                            blurpool=cfg.model.blurpool, drop_path=cfg.model.drop_path, seed=tc.seed).to(self.device)
        self.drop_path = drop_path_draws(model)  # stochastic depth's masks, drawn per micro-batch
        d = cfg.data
        self.mixer = (BatchMixer(len(self.classes), tc.seed, d.mixup_alpha, d.cutmix_alpha, d.mix_switch_prob)
                      if d.mixup_alpha or d.cutmix_alpha else None)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        scale = tc.global_batch / cfg.optim.lr_base_batch if cfg.optim.lr_base_batch else 1.0
        self.peak_lr = cfg.optim.lr * scale
        entry = OPTIMIZERS.get(cfg.optim.name)
        # A hyperparameter 0 that means "the training set size" (IVON's ess): the engine gets
        # the number, the recipe keeps the 0.
        hparams = entry.with_train_size(cfg.optim.hparams, manifest.counts["train"] - cfg.data.minival)
        self.engine = build_engine(model, engine_setup(cfg, self.peak_lr, hparams))
        self.sampling = WeightSampling(self.engine, tc.grad_clip)
        self.forward = torch.compile(self.engine.wrapped) if cfg.model.compile else self.engine.wrapped
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.engine.optimizer, lr_lambda(cfg.schedule, self.total_steps, self.steps_per_epoch))
        self.ema = WeightEMA(self.engine.model, tc.ema_decay) if tc.ema_decay else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
        self.log_diagnostics = entry.diagnostics
        # Gradient transforms: the loop hands them the engine's averaged gradient before clipping
        # and the step (`_transform_grads`), and calls their hooks (`vsgd_dist.transforms.registry`).
        self.transforms = build_transforms(cfg, TransformContext(
            engine=self.engine, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            log_every=self.log_every, seed=tc.seed, gradient=self._gradient, read_steps=self._read_steps))

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=tc.keep_checkpoints,
                                         background=tc.async_checkpoint)
        self.timer = StepTimer(self.device)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.window_losses, self.window_start = [], time.perf_counter()

    def _resume(self) -> None:
        """Continue where the latest checkpoint left off: weights, optimizer shards, schedule,
        data position, RNG, EMA; then the TensorBoard writer. The TensorBoard step is the
        optimizer step."""
        loaded = self.checkpointer.load_latest(self.engine, self.cfg)
        if loaded:
            self.step, self.epoch, self.batch_in_epoch = loaded["step"], loaded["epoch"], loaded["batch_in_epoch"]
            self.scheduler.load_state_dict(loaded["scheduler"])
            restore_rng(loaded["rng"])
            if self.ema is not None:
                self.ema.load(loaded["ema"])
        # A completed run logs nothing again (not even a new events file).
        self.finished = self._finished_result() if loaded else None
        # A run killed after its last checkpoint logged steps it will now log again: TensorBoard
        # hides the old events from the first step this run will log on.
        self.logger = RunLogger(str(self.run_dir / "tb"), enabled=self.rank == 0 and self.finished is None,
                                purge_step=self.step + 1 if loaded else None)
        if loaded and self.rank == 0 and self.finished is None:  # said in the log (SLURM's .err, launch run's output) and in TensorBoard
            note = f"resumed from step {self.step} ({self.checkpointer.latest()})"
            print(f"trainer: {note}", file=sys.stderr, flush=True)
            self.logger.text("run/resumed", note, self.step)
        saved = loaded or {}
        for t in self.transforms:  # their per-element state is resharded like optimizer state
            tensors = {k.split("/", 1)[1]: v for k, v in saved.get("grad_state", {}).items()
                       if k.startswith(t.name + "/")}
            t.load_state_dict(saved.get("transforms", {}).get(t.name), tensors, self.step)
        self.progress = make_progress(self.total_steps, self.step,
                                      enabled=self.rank == 0 and self.cfg.train.progress)

    def _batches_of_epoch(self):
        """The rest of the current epoch's steps (see `_steps_from`), stopping at the last
        step. Gradient transforms' `before_steps` runs before the loader is opened (they may
        read batches themselves then) and says for how many steps it may stay open."""
        self.engine.model.train()
        while self.step < self.total_steps and self.batch_in_epoch < self.steps_per_epoch:
            steps = self.steps_per_epoch - self.batch_in_epoch
            for t in self.transforms:
                with self.timer.phase("grad_transform"):
                    steps = min(steps, t.before_steps(self.step, self.epoch))
            with contextlib.closing(self._steps_from(self.epoch, self.batch_in_epoch)) as steps_of_epoch:
                for _ in range(steps):
                    if self.step >= self.total_steps:
                        return
                    with self.timer.phase("data_wait"):
                        micro_batches = next(steps_of_epoch, None)
                    if micro_batches is None:
                        return
                    yield micro_batches

    def _steps_from(self, epoch: int, batch: int):
        """Steps `batch`, `batch` + 1, ... of `epoch`, each a list of train.accum_steps micro-batches
        (an incomplete step at the epoch's end is dropped), see `_micro_batch`."""
        accum = self.cfg.train.accum_steps
        batches = train_epoch(self.train_loader, self.cfg.data, epoch, batch * accum)
        try:
            for step in itertools.count(batch):
                micro_batches = [self._micro_batch(images, labels, (epoch, step, i))
                                 for i, (images, labels) in enumerate(itertools.islice(batches, accum))]
                if len(micro_batches) < accum:
                    return
                yield micro_batches
        finally:
            if hasattr(batches, "close"):
                batches.close()  # stops the loader's decoding thread

    def _micro_batch(self, images: torch.Tensor, labels: torch.Tensor, position: tuple[int, int, int]) -> tuple:
        """(images, targets, position): with Mixup/CutMix the mixed images and soft targets
        (drawn per (seed, epoch, step)), else the labels; `position` = (epoch, step in the
        epoch, micro-batch) keys the drop-path masks. A micro-batch held while the next is read
        is a copy: ffcv reuses its batch buffers."""
        if self.mixer is not None:
            images, labels = self.mixer(images, labels, position[0], position[1])
        elif self.cfg.train.accum_steps > 1:
            images, labels = images.clone(), labels.clone()
        return images, labels, position

    def _read_steps(self, epoch: int, first: int, count: int):
        """Steps `first` ... `first + count - 1` of `epoch` (fewer at the epoch's end), read
        from the train loader for a gradient transform: the same images, crops, flips and mixes
        training gets, since the loader's draws are keyed by seed, epoch and sample index."""
        with contextlib.closing(self._steps_from(epoch, first)) as steps:
            yield from itertools.islice(steps, count)

    def _train_step(self, micro_batches: list) -> None:
        """One optimizer step: per weight sample (one for optimizers that train at the mean) a
        forward/backward of every micro-batch, each loss divided by their number so the
        gradients add up to the batch mean, synchronized by the last backward only; then the
        update. The logged loss is the mean over samples and micro-batches."""
        losses, samples = [], self.sampling.mc_samples
        for t in self.transforms:
            with self.timer.phase("grad_transform"):
                t.before_step(self.step, self.epoch, micro_batches)
        for k in range(samples):
            with self.timer.phase("optimizer"):
                self.sampling.sample(k)
            with self.timer.phase("forward_backward"):
                losses += self._forward_backward(micro_batches)
                if k + 1 < samples:
                    self._transform_grads()
                    self.sampling.accumulate()
        with self.timer.phase("optimizer"):
            self._transform_grads()
            self.grad_norm = self.engine.step()
            if self.ema is not None:
                self.sampling.mean_weights()  # ZeRO defers the mean's all-gather after a sampling step
                self.ema.update()
        self.scheduler.step()
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
        self.window_losses.append(sum(losses) / len(losses))
        self.progress.update(1)

    def _forward_backward(self, micro_batches: list) -> list[torch.Tensor]:
        """Forward/backward of one step's micro-batches, each loss divided by their number so
        the gradients add up to the batch mean, synchronized by the last backward only; returns
        the losses."""
        losses, accum = [], len(micro_batches)
        for i, (images, targets, (epoch, step, micro)) in enumerate(micro_batches):
            if self.drop_path is not None:
                self.drop_path.draw(images.shape[0], epoch, step, self.rank * accum + micro, self.device)
            with self.engine.no_sync() if i + 1 < accum else contextlib.nullcontext():
                with self.autocast:
                    loss = self.criterion(self.forward(images), targets)
                self.engine.backward(loss / accum)
            losses.append(loss.detach())
        return losses

    def _transform_grads(self) -> None:
        """Hand the engine's averaged gradient to each gradient transform, in order, before
        clipping and the step (or a weight sample's accumulation)."""
        if self.transforms:
            grads = self.engine.reduced_grads()
            for t in self.transforms:
                t.apply(grads)

    def _gradient(self, micro_batches: list) -> list[torch.Tensor]:
        """The averaged gradient of one step's micro-batches at the weights the model holds,
        as this rank holds it after the engine's reduction (`TransformContext.gradient`)."""
        self._forward_backward(micro_batches)
        return self.engine.reduced_grads()

    def _checkpoint_due(self) -> bool:
        return bool(self.cfg.train.ckpt_every) and self.step % self.cfg.train.ckpt_every == 0

    def _end_epoch(self) -> dict | None:
        """After an epoch's last batch: move to the next epoch and validate when due."""
        if self.batch_in_epoch < self.steps_per_epoch:
            return None  # the run ended mid-epoch
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.epoch % self.cfg.train.val_every_epochs == 0 and self.step < self.total_steps:
            return self._validate()
        return None

    def _window_mean_loss(self) -> float:
        """Mean train loss since the last log over all ranks; raises on a non-finite loss,
        naming the step and the checkpoint to resume from."""
        losses = all_reduce(torch.stack(self.window_losses).float()) / self.world
        bad = (~losses.isfinite()).nonzero()
        if len(bad):
            first_bad = self.step - len(losses) + 1 + int(bad[0, 0])
            raise FloatingPointError(f"loss is {losses[bad[0, 0]].item()} at step {first_bad}: stopping; "
                                     f"{self.checkpointer.describe_latest()} (lower optim.lr, set "
                                     f"train.grad_clip, or check the data)")
        return losses.mean().item()

    def _log_train(self) -> None:
        tc, d = self.cfg.train, self.cfg.data
        steps = len(self.window_losses)
        mean_loss = self._window_mean_loss()
        elapsed = time.perf_counter() - self.window_start
        held = reduce_host_values([state_bytes(self.engine.ownership())], op="max")[0]
        self.logger.scalars({
            "train/loss": mean_loss, "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": float(self.grad_norm), "train/images_per_s": steps * tc.global_batch / elapsed,
            "train/epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
            "train/resolution": resolution_at_epoch(self.epoch, d.start_res, d.end_res, d.ramp_start_epoch,
                                                    d.ramp_end_epoch, d.res_step),
            "optimizer/state_mib_per_rank": held / 2**20,
            **{k: v for t in self.transforms for k, v in t.log_values().items()},
            **self.timer.pop_ms_per_step(steps), **memory_stats(self.device)}, self.step)
        self.progress.set_postfix(loss=f"{mean_loss:.3f}")
        self.window_losses, self.window_start = [], time.perf_counter()

    def _log_diagnostics(self) -> None:
        """The optimizer's own per-layer statistics (`OptimizerEntry.diagnostics`), as
        `<optimizer>/<stat>/<layer group>` means and `<optimizer>_hist/<stat>` histograms."""
        diagnostics, name, own = self.log_diagnostics, self.cfg.optim.name, self.engine.ownership()
        means, histograms = reduced_diagnostics(diagnostics, state_pieces(own, diagnostics.state_keys),
                                                layer_group, reduce=own.sharded_state, device=self.device,
                                                process_group=own.shard_group)
        self.logger.scalars({f"{name}/{stat}/{group}": stats[stat] for group, stats in means.items()
                             for stat in diagnostics.histograms}, self.step)
        for stat, counts in histograms.items():
            _, low, high = diagnostics.histograms[stat]
            self.logger.histogram(f"{name}_hist/{stat}", counts, low, high, self.step)

    def _stop_agreed(self) -> bool:
        """Every rank stops at the same step if any rank was asked to: checked every
        train.stop_check_every steps, as a host value (no device sync)."""
        if self.step % self.cfg.train.stop_check_every:
            return False
        return reduce_host_values([float(self._stop_requested.is_set())], op="max")[0] > 0

    def _save(self) -> None:
        if self.window_losses:
            self._window_mean_loss()  # a NaN since the last log is reported before anything is saved
        # The events up to this step reach the disk before the checkpoint that a killed run
        # resumes from: the writer's own flush (every 2 min) would lose them, and the resumed
        # run never logs those steps again.
        self.logger.flush()
        sync_buffers(self.engine.model)
        values, grad_state = {}, {}
        for t in self.transforms:
            values[t.name], tensors = t.state_dict()
            grad_state.update({f"{t.name}/{key}": v for key, v in tensors.items()})
        self.checkpointer.save(self.engine, self.cfg, step=self.step, epoch=self.epoch,
                               batch_in_epoch=self.batch_in_epoch, scheduler=self.scheduler.state_dict(),
                               rng=capture_rng(), ema=self.ema.state() if self.ema else None,
                               transforms=values, grad_state=grad_state)

    @torch.no_grad()
    def _validate(self) -> dict:
        """Top-1/top-5, NLL and ECE over the whole val set, and the minival split alike
        (data.minival, the tuning split): exact sums over ranks (each rank
        reads a disjoint part, no padding). An optimizer that trains at weight samples adds
        the posterior predictive over train.val_mc_samples samples; with EMA, the EMA
        weights are evaluated too (at the EMA only: the samples spread around the mean)."""
        sync_buffers(self.engine.model)
        self.sampling.mean_weights()
        samples = self.cfg.train.val_mc_samples if self.sampling.samples else 0
        results = self._evaluate("val", samples)
        if self.minival_loader is not None:
            results.update(self._evaluate("minival", samples, self.minival_loader))
        if self.ema is not None:
            with self.ema.swapped_in():
                results.update(self._evaluate("val_ema"))
        self.logger.flush()
        return results

    def _evaluate(self, prefix: str, samples: int = 0, loader=None) -> dict:
        """Metrics of the model as it is and, with `samples`, of the posterior predictive:
        the softmax averaged over that many weight samples (the optimizer's evaluation noise,
        BatchNorm with its running statistics), `predictive_*`. One host sync at the end.
        `loader`: another split than val (minival)."""
        model = self.engine.model
        model.eval()
        sums = torch.zeros(2 if samples else 1, SUMS_SIZE, dtype=torch.float64, device=self.device)
        for images, labels in self.val_loader if loader is None else loader:
            sums[0] += prediction_sums(self._log_probs(images), labels)
            if samples:
                log_probs = []
                for k in range(samples):
                    self.sampling.sample(k, evaluation=True)
                    log_probs.append(self._log_probs(images))
                self.sampling.mean_weights()
                sums[1] += prediction_sums(torch.logsumexp(torch.stack(log_probs), 0) - math.log(samples), labels)
        model.train()
        sums = all_reduce(sums).cpu()
        metrics = metrics_from_sums(sums[0])
        if samples:
            metrics.update({f"predictive_{k}": v for k, v in metrics_from_sums(sums[1]).items()})
        self.logger.scalars({f"{prefix}/{k}": v for k, v in metrics.items()}, self.step)
        return {f"{prefix}_{k}": v for k, v in metrics.items()}

    def _log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """With train.val_flip, of the logits averaged over the image and its mirror image."""
        with self.autocast:
            logits = self.forward(images).float()
            if self.cfg.train.val_flip:
                logits = (logits + self.forward(images.flip(3)).float()) / 2
            return logits.log_softmax(1)

    def _log_hparams(self, result: dict) -> None:
        cfg = self.cfg
        self.logger.hparams({"optimizer": cfg.optim.name, "engine": cfg.engine.name, "model": cfg.model.name,
                             "lr": self.peak_lr, "global_batch": cfg.train.global_batch, "world_size": self.world,
                             "seed": cfg.train.seed},
                            {f"hparam/val_{k}": result[f"val_{k}"] for k in ("top1", "nll", "ece")})


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
