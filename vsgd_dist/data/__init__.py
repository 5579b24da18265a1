"""FFCV data layer: write ImageFolder trees to .beton, load them per rank, resume mid-epoch.

Train crops, flips and the DeiT augmentations (RandAugment and random erasing in the decoder,
repeated augmentation in the order, Mixup/CutMix per batch on the device: augment.py,
randaugment.py, repeated.py, mixup.py) are functions of (seed, epoch, draw index) or (seed,
epoch, step), so a seed repeats a run and a resumed run continues bitwise, at any thread count.

Trainer usage:
    files = resolve_dataset(cfg)                 # classes: files.manifest.classes
    train = build_train_loader(cfg, device, batch_size=per_rank, seed=seed, distributed=True)
    val = build_val_loader(cfg, device, batch_size=per_rank, distributed=True)
    for epoch in range(start_epoch, epochs):
        for images, labels in train_epoch(train, cfg, epoch, start_batch):
            ...                                  # checkpoint (epoch, batches consumed)
        start_batch = 0
"""
from vsgd_dist.compat import ffcv as _ffcv_compat

_ffcv_compat.install_cheap_import()  # first: every later ffcv import is ~6 s cheaper
_ffcv_compat.fix_reader_type()  # before any loader compiles its reader

from .config import DataConfig
from .demo import ensure_demo_data
from .epochs import iterate_from, train_epoch
from .errors import DataError
from .image_folder import write_image_folder
from .loaders import build_train_loader, build_val_loader, resolve_dataset, set_train_resolution
from .manifest import DatasetFiles, Manifest, open_dataset_dir, read_manifest
from .schedule import resolution_at_epoch
from .validate import BetonInfo, inspect_beton
from .writer import WriteSettings

__all__ = [
    "BetonInfo", "DataConfig", "DataError", "DatasetFiles", "Manifest", "WriteSettings",
    "build_train_loader", "build_val_loader", "ensure_demo_data", "inspect_beton", "iterate_from",
    "open_dataset_dir", "read_manifest", "resolution_at_epoch", "resolve_dataset",
    "set_train_resolution", "train_epoch", "write_image_folder",
]
