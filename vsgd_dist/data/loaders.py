"""FFCV train and val loaders, checked before they are built.

Where images are normalized depends on the device. On CUDA they leave the host as uint8
(a quarter of fp32's bytes) and are normalized on the GPU: ToDevice(non_blocking),
ToTorchImage, then `normalize.normalize_on_device`, a few torch kernels that ffcv's loading
thread runs on its CUDA stream (ffcv's own NormalizeImage needs cupy on GPU). On the CPU,
NormalizeImage runs in the decoding threads before ToTensor: the usual order, normalizing
after ToTorchImage, hangs inside Loader() on CPU. Both give the same values bit for bit
(normalize.py looks up NormalizeImage's table).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from vsgd_dist.distributed import gather_host_values

from .config import MAX_RES, MIN_RES, DataConfig
from .demo import ensure_demo_data
from .errors import DataError
from .manifest import DatasetFiles, open_dataset_dir
from .minival import minival_split
from .normalize import IMAGENET_MEAN, IMAGENET_STD, TORCH_DTYPES, normalize_on_device
from .validate import BetonInfo, inspect_beton


def resolve_dataset(cfg: DataConfig) -> DatasetFiles:
    """The dataset cfg points at (the digits demo when cfg.data_dir is empty)."""
    return open_dataset_dir(cfg.data_dir) if cfg.data_dir else ensure_demo_data()


def build_train_loader(cfg: DataConfig, device: torch.device | str, *, batch_size: int, seed: int = 0,
                       distributed: bool = False):
    """Random-resized-crop + flip loader over this rank's shard, `batch_size` images per
    batch, full batches only, with the DeiT augmentations cfg turns on: RandAugment and
    random erasing in the decoder, repeated augmentation in the order (Mixup/CutMix work on
    device batches: mixup.py). Order, crops and augmentations are seeded by (seed, epoch,
    draw index), the same seed on every rank, so runs repeat and resume exactly.

    Returns an ffcv Loader; iterate it with `train_epoch` (sets the epoch's resolution, order
    and crops, and resumes mid-epoch). distributed=True needs torch.distributed initialized.
    """
    from ffcv.loader import OrderOption

    from .augment import CheckedLoader, SeededCropFlipDecoder
    from .repeated import RepeatedOrder

    cfg.check()
    if distributed and not cfg.os_cache:
        raise DataError("os_cache=False (quasi-random order) works in a single process only; "
                        "set os_cache=True for distributed runs")
    device = _checked_device(device)
    world = _world_size(distributed)
    files = resolve_dataset(cfg)
    info = _checked_file(files.train, len(files.manifest.classes))
    indices, _ = minival_split(info.num_samples, cfg.minival, cfg.minival_seed)
    if not 1 <= batch_size <= len(indices) // world:
        raise DataError(f"{files.train}: batch_size {batch_size} is outside [1, this rank's "
                        f"shard ({len(indices)} images / {world} ranks = "
                        f"{len(indices) // world}]); lower the batch")
    if distributed:
        _check_same_seed(seed)
    decoder = SeededCropFlipDecoder((cfg.start_res, cfg.start_res), seed=seed,
                                    scale_min=cfg.crop_scale_min, flip=cfg.flip,
                                    randaugment=(cfg.randaugment_n, cfg.randaugment_m, cfg.randaugment_mstd),
                                    erase_prob=cfg.erase_prob)
    if cfg.repeated_aug > 1:
        order = RepeatedOrder(cfg.repeated_aug, info.num_samples)
    else:
        order = OrderOption.RANDOM if cfg.os_cache else OrderOption.QUASI_RANDOM
    return CheckedLoader(
        str(files.train), batch_size=batch_size, num_workers=cfg.num_workers,
        os_cache=cfg.os_cache, distributed=distributed, seed=seed, drop_last=True, indices=indices,
        order=order, pipelines=_pipelines(info, [decoder], cfg, device))


def build_val_loader(cfg: DataConfig, device: torch.device | str, *, batch_size: int, distributed: bool = False,
                     minival: bool = False):
    """Center-crop loader in file order; with distributed=True each rank reads every
    world_size-th image, so the ranks together see each image exactly once (no padding).
    minival=True: the same over the images data.minival holds out of the train file.
    Iterating it raises DataError on a JPEG that does not decode."""
    from ffcv.loader import OrderOption

    from .augment import CenterCropDecoder, CheckedLoader

    cfg.check()
    device = _checked_device(device)
    world = _world_size(distributed)
    rank = dist.get_rank() if distributed else 0
    files = resolve_dataset(cfg)
    path = files.train if minival else files.val
    info = _checked_file(path, len(files.manifest.classes))
    images = (minival_split(info.num_samples, cfg.minival, cfg.minival_seed)[1] if minival
              else np.arange(info.num_samples))
    if len(images) < world:
        raise DataError(f"{path}: {len(images)} {'minival ' if minival else ''}images cannot be split over "
                        f"{world} ranks; use fewer ranks or a larger split")
    decoder = CenterCropDecoder((cfg.val_res, cfg.val_res), ratio=cfg.val_crop_ratio)
    return CheckedLoader(
        str(path), batch_size=batch_size, num_workers=cfg.num_workers,
        os_cache=cfg.os_cache, order=OrderOption.SEQUENTIAL, drop_last=False,
        indices=images[rank::world],
        pipelines=_pipelines(info, [decoder], cfg, device))


def set_train_resolution(loader, res: int) -> None:
    """Change the train crop size; takes effect at the next epoch iterator (no recompile:
    ffcv sizes its buffers per epoch)."""
    if not MIN_RES <= res <= MAX_RES:
        raise DataError(f"train resolution {res} is outside [{MIN_RES}, {MAX_RES}] pixels")
    loader.pipeline_specs["image"].decoder.output_size = (res, res)


def normalizes_on_device(device: torch.device) -> bool:
    """Whether images travel as uint8 and are normalized on `device` (CUDA) rather than by
    the decoding threads (CPU)."""
    return device.type == "cuda"


def _pipelines(info: BetonInfo, image_ops: list, cfg: DataConfig, device: torch.device) -> dict:
    from ffcv.transforms import Convert, NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

    from .repeated import LabelDecoder

    if normalizes_on_device(device):
        image = [*image_ops, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True),
                 normalize_on_device(TORCH_DTYPES[cfg.dtype])]
    else:
        # fp16 is normalized straight to fp16 (ToTorchImage views ffcv's int16 carrier as fp16);
        # numpy has no bf16, so bf16 is normalized to fp32 and converted at the end.
        np_dtype = np.float16 if cfg.dtype == "fp16" else np.float32
        image = [*image_ops, NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np_dtype), ToTensor(),
                 ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
        if cfg.dtype == "bf16":
            image.append(Convert(torch.bfloat16))
    label = [LabelDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]
    unused = {name: None for name in info.field_names if name not in ("image", "label")}
    return {"image": image, "label": label, **unused}


def _checked_file(path, num_classes: int) -> BetonInfo:
    info = inspect_beton(path)
    if info.num_classes > num_classes:
        raise DataError(f"{path}: has label {info.num_classes - 1} but the manifest lists "
                        f"{num_classes} classes; write the folder again")
    return info


def _checked_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)  # ffcv's ToDevice needs a torch.device, not a string
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device {device} requested but CUDA is not available; use device 'cpu'")
    return device


def _world_size(distributed: bool) -> int:
    if not distributed:
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        raise DataError("distributed=True but torch.distributed is not initialized; call "
                        "init_process_group first, or pass distributed=False")
    return dist.get_world_size()


def _check_same_seed(seed: int) -> None:
    """ffcv shards one seeded permutation per epoch; different seeds would overlap shards."""
    seeds = [int(s) for s in gather_host_values(seed)]
    if len(set(seeds)) > 1:
        raise DataError(f"data seed differs across ranks ({seeds}); every rank must use the same seed")
