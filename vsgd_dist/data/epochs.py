"""Iterate one epoch of a train loader from any batch: exact mid-epoch resume.

ffcv's order for an epoch is a pure function of (seed, epoch, world size, dataset size):
np.random.default_rng(seed + epoch) in one process, torch's DistributedSampler(seed) with
set_epoch(epoch) across ranks. So resuming needs only the epoch and the number of batches
already consumed: save both in the checkpoint and pass them back here with the same seed,
batch size and world size (repeated augmentation's order, repeated.py, is a function of (seed,
epoch) too). Skipped batches are not decoded. Crops, flips, RandAugment and erasing are a
function of (seed, epoch, draw index) (augment.py), so the resumed batches are bitwise the same too.
"""
from __future__ import annotations

from typing import Iterator

from .config import DataConfig
from .errors import DataError
from .loaders import set_train_resolution
from .schedule import resolution_at_epoch


def iterate_from(loader, epoch: int, start_batch: int = 0) -> Iterator:
    """Batches `start_batch, start_batch+1, ...` of `epoch`, with the order and crops `epoch`
    always has.

    Also leaves the loader's order at epoch + 1; a plain `for batch in loader` would continue
    that order but keep this epoch's crops, so iterate every epoch through here.
    """
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    from .augment import checked_batches

    num_batches = len(loader)
    if not 0 <= start_batch <= num_batches:
        raise DataError(f"start_batch {start_batch} is outside [0, {num_batches}] for this loader; "
                        f"resume with the batch size and world size the checkpoint was made with")
    # Mirrors ffcv 1.0.2's Loader.__iter__, with the epoch chosen and the order sliced.
    loader.next_epoch = epoch
    order = loader.next_traversal_order()[:num_batches * loader.batch_size]
    loader.next_epoch = epoch + 1
    loader.pipeline_specs["image"].decoder.epoch = epoch  # read by the compiled decoder per batch
    if start_batch == num_batches:
        return iter(())
    Compiler.set_num_threads(loader.num_workers)
    return checked_batches(loader, EpochIterator(loader, order[start_batch * loader.batch_size:]))


def train_epoch(loader, cfg: DataConfig, epoch: int, start_batch: int = 0) -> Iterator:
    """The trainer's per-epoch call: set the epoch's progressive-resizing resolution, then
    iterate_from(loader, epoch, start_batch)."""
    set_train_resolution(loader, resolution_at_epoch(epoch, cfg.start_res, cfg.end_res,
                                                     cfg.ramp_start_epoch, cfg.ramp_end_epoch,
                                                     cfg.res_step))
    return iterate_from(loader, epoch, start_batch)
