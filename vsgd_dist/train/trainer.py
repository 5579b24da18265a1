"""The training loop: one class, read top to bottom.

`Trainer(cfg, run_dir).run()` is what every launcher calls (local processes, submitit on
SLURM, the sbatch template). The process group comes from the environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the engine (DDP / native ZeRO / FSDP2 / DeepSpeed)
and the optimizer (VSGD / AdamW) are config choices and the loop never branches on them.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vsgd_dist.config import RunConfig, config_from_dict
from vsgd_dist.data import build_train_loader, build_val_loader, resolve_dataset, train_epoch
from vsgd_dist.data.schedule import resolution_at_epoch
from vsgd_dist.engines import build_engine
from vsgd_dist.metrics import RunLogger, StepTimer, finite_or_raise, memory_stats
from vsgd_dist.models import build_model, layer_group
from vsgd_dist.optim.diagnostics import HISTOGRAM_RANGES, STATS, reduced_diagnostics
from vsgd_dist.spawn import free_port
from vsgd_dist.train.checkpoint import Checkpointer, claim_run_dir
from vsgd_dist.train.schedule import lr_lambda
from vsgd_dist.train.state import capture_rng, restore_rng


class Trainer:
    """Trains `cfg` into `run_dir`, resuming from the latest checkpoint found there."""

    def __init__(self, cfg: RunConfig | dict, run_dir: str | None = None):
        self.cfg = cfg if isinstance(cfg, RunConfig) else config_from_dict(cfg)
        self.run_dir = Path(run_dir or self.cfg.train.out)
        self._stop_requested = threading.Event()

    def request_stop(self) -> None:
        """Thread-safe: save a checkpoint at the next step boundary and return (preemption)."""
        self._stop_requested.set()

    # ------------------------------------------------------------------------------ run
    def run(self) -> dict:
        owns_group = init_distributed()
        try:
            return self._run()
        finally:
            if owns_group:
                dist.barrier()  # without it, 3+ rank gloo runs sometimes abort at exit
                dist.destroy_process_group()

    def _run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        world, rank = dist.get_world_size(), dist.get_rank()
        device = pick_device()
        cfg.check(world)
        claim_run_dir(self.run_dir, cfg, rank)
        torch.manual_seed(t.seed)  # same initial weights on every rank

        # Data: each rank reads global_batch / world_size images per step.
        data_cfg = dataclasses.replace(cfg.data, batch_size=t.global_batch // world, seed=t.seed)
        classes = resolve_dataset(data_cfg).manifest.classes
        train_loader = build_train_loader(data_cfg, device, distributed=world > 1)
        val_loader = build_val_loader(data_cfg, device, distributed=world > 1)
        steps_per_epoch = len(train_loader)
        total_steps = t.max_steps or t.epochs * steps_per_epoch

        # Model, engine (wrapper + optimizer), LR schedule stepped every iteration.
        model = build_model(cfg.model.name, len(classes), image_size=data_cfg.end_res).to(device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        peak_lr = cfg.optim.lr * (t.global_batch / cfg.optim.lr_base_batch if cfg.optim.lr_base_batch else 1.0)
        engine = build_engine(model, cfg, peak_lr)
        forward = torch.compile(engine.module) if cfg.model.compile else engine.module
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            engine.optimizer, lr_lambda(cfg.schedule, total_steps, steps_per_epoch))
        ema = [p.detach().clone() for p in model.parameters()] if t.ema_decay else None
        criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")

        # Resume where the latest checkpoint left off (model, optimizer shards, schedule,
        # data position, RNG, EMA). The TensorBoard step is the optimizer step.
        ckpt = Checkpointer(self.run_dir / "checkpoints", keep=t.keep_checkpoints)
        step, epoch, batch_in_epoch = 0, 0, 0
        loaded = ckpt.load_latest(engine, cfg)
        if loaded:
            step, epoch, batch_in_epoch = loaded["step"], loaded["epoch"], loaded["batch_in_epoch"]
            scheduler.load_state_dict(loaded["scheduler"])
            restore_rng(loaded["rng"])
            if ema is not None:
                torch._foreach_copy_(ema, loaded["ema"])

        def save() -> None:
            engine.sync_buffers()
            ckpt.save(engine, cfg, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                      scheduler=scheduler.state_dict(), rng=capture_rng(), ema=ema)

        logger = RunLogger(str(self.run_dir / "tb"), enabled=rank == 0)
        progress = make_progress(total_steps, step, enabled=rank == 0 and t.progress)
        timer = StepTimer(device)
        window_losses, window_start, window_steps = [], time.perf_counter(), 0
        status, result = "completed", {}
        while step < total_steps:
            batches = iter(train_epoch(train_loader, data_cfg, epoch, batch_in_epoch))
            model.train()
            while step < total_steps:
                with timer.phase("data_wait"):
                    batch = next(batches, None)
                if batch is None:
                    break
                images, labels = batch
                with timer.phase("forward_backward"):
                    with autocast:
                        loss = criterion(forward(images), labels)
                    engine.backward(loss)
                with timer.phase("optimizer"):
                    grad_norm = engine.step()
                    if ema is not None:
                        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - t.ema_decay)
                scheduler.step()
                step, batch_in_epoch = step + 1, batch_in_epoch + 1
                window_losses.append(loss.detach())
                window_steps += 1
                progress.update(1)

                if step % t.log_every == 0 or step == total_steps:
                    losses = torch.stack(window_losses).float()
                    dist.all_reduce(losses)
                    losses /= world
                    bad = (~losses.isfinite()).nonzero()
                    if len(bad):
                        finite_or_raise(losses[bad[0, 0]].item(), step - len(losses) + 1 + bad[0, 0].item())
                    elapsed = time.perf_counter() - window_start
                    mean_loss = losses.mean().item()
                    logger.scalars({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0],
                                    "train/grad_norm": float(grad_norm),
                                    "train/images_per_s": window_steps * t.global_batch / elapsed,
                                    "train/epoch": epoch + batch_in_epoch / steps_per_epoch,
                                    "train/resolution": resolution_at_epoch(
                                        epoch, data_cfg.start_res, data_cfg.end_res, data_cfg.ramp_start_epoch,
                                        data_cfg.ramp_end_epoch, data_cfg.res_step),
                                    "optimizer/state_mib_per_rank": max_over_ranks(engine.state_bytes(), device) / 2**20,
                                    **timer.pop_ms_per_step(window_steps), **memory_stats(device)}, step)
                    progress.set_postfix(loss=f"{mean_loss:.3f}")
                    window_losses, window_start, window_steps = [], time.perf_counter(), 0
                if cfg.optim.name == "vsgd" and (step % t.diag_every == 0 or step == total_steps):
                    self._log_diagnostics(engine, logger, step, device)

                if self._stop_agreed(device) or step == t.stop_at:
                    status = "stopped"
                    break
                if t.ckpt_every and step % t.ckpt_every == 0:
                    save()
            if status == "stopped":
                break
            if batch_in_epoch == steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
                if epoch % t.val_every_epochs == 0 and step < total_steps:
                    result = self._validate(engine, forward, val_loader, autocast, logger, step, ema, device)

        progress.close()
        save()  # at max_steps, at stop_at, or on a stop request: the resume point
        if status == "completed":
            result = self._validate(engine, forward, val_loader, autocast, logger, step, ema, device)
            logger.hparams({"optimizer": cfg.optim.name, "engine": cfg.engine.name, "model": cfg.model.name,
                            "lr": peak_lr, "global_batch": t.global_batch, "world_size": world, "seed": t.seed},
                           {"hparam/val_top1": result["val_top1"]})
        logger.close()
        return {"status": status, "step": step, **result}

    # ------------------------------------------------------------------------ helpers
    def _stop_agreed(self, device: torch.device) -> bool:
        """Every rank stops at the same step if any rank was asked to stop."""
        flag = torch.tensor([1.0 if self._stop_requested.is_set() else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @torch.no_grad()
    def _validate(self, engine, forward, loader, autocast, logger, step, ema, device) -> dict:
        """Top-1/top-5 over the whole val set: exact counts summed over ranks (each rank
        reads a disjoint part, no padding). With EMA, the EMA weights are evaluated too."""
        engine.sync_buffers()
        results = {}
        for prefix, weights in (("val", None), ("val_ema", ema)):
            if prefix == "val_ema" and weights is None:
                continue
            with swapped_weights(engine.model, weights):
                engine.model.eval()
                # top1, top5, loss sum, images; kept on the device (no host sync per batch,
                # and NCCL reduces device tensors only)
                counts = torch.zeros(4, dtype=torch.float64, device=device)
                for images, labels in loader:
                    with autocast:
                        logits = forward(images).float()
                    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    hits = top5 == labels[:, None]
                    counts[0] += hits[:, 0].sum()
                    counts[1] += hits.any(1).sum()
                    counts[2] += nn.functional.cross_entropy(logits, labels, reduction="sum")
                    counts[3] += len(labels)
                dist.all_reduce(counts)
                engine.model.train()
            top1, top5, loss_sum, n = counts.tolist()
            results.update({f"{prefix}_top1": top1 / n, f"{prefix}_top5": top5 / n, f"{prefix}_loss": loss_sum / n})
            logger.scalars({f"{prefix}/top1": top1 / n, f"{prefix}/top5": top5 / n, f"{prefix}/loss": loss_sum / n}, step)
        logger.flush()
        return results

    def _log_diagnostics(self, engine, logger, step, device) -> None:
        means, histograms = reduced_diagnostics(engine.vsgd_state_pieces(), layer_group,
                                                reduce=engine.sharded_state, device=device)
        logger.scalars({f"vsgd/{stat}/{group}": stats[stat] for group, stats in means.items() for stat in STATS},
                       step)
        for stat, counts in histograms.items():
            _, low, high = HISTOGRAM_RANGES[stat]
            logger.histogram(f"vsgd_hist/{stat}", counts, low, high, step)


# ------------------------------------------------------------------------ process setup
def init_distributed() -> bool:
    """Join the process group described by the environment (a single process gets a
    world of one). Returns whether this call created it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    dist.init_process_group(backend)
    return True


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class swapped_weights:
    """Temporarily load `weights` (a list matching model.parameters()) into the model."""

    def __init__(self, model: nn.Module, weights):
        self.model, self.weights, self.saved = model, weights, None

    def __enter__(self):
        if self.weights is not None:
            params = [p.detach() for p in self.model.parameters()]
            self.saved = [p.clone() for p in params]
            torch._foreach_copy_(params, self.weights)

    def __exit__(self, *exc):
        if self.saved is not None:
            torch._foreach_copy_([p.detach() for p in self.model.parameters()], self.saved)


def make_progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
