"""Check a .beton file before an FFCV Loader touches it.

ffcv trusts its file: a missing, truncated or foreign file makes a Loader fail inside a
worker thread, and that hangs the training loop. Everything checked here is read from the
header, metadata and allocation table, so it is fast even for ImageNet.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

EXPECTED_FIELDS = {"image": "RGBImageField", "label": "IntField"}
WRITE_HINT = "write it with `python -m launch data write --src DIR --out DIR`"


@dataclass(frozen=True)
class BetonInfo:
    """What a valid dataset file holds."""

    path: str
    """The file."""
    num_samples: int
    """Number of (image, label) samples."""
    num_classes: int
    """1 + the largest label."""
    max_side: int
    """Longest stored image side in pixels."""
    field_names: tuple[str, ...]
    """All field names in the file (image and label at least)."""


def inspect_beton(path: str | os.PathLike) -> BetonInfo:
    """Return the file's BetonInfo, or raise DataError naming what is wrong and the fix."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file; {WRITE_HINT}")
    if path.suffix != ".beton":
        raise DataError(f"{path}: not a .beton file; pass the train.beton/val.beton that "
                        f"`python -m launch data write` produced")
    size = path.stat().st_size
    bad = f"{path}: corrupt or truncated FFCV file"
    if size < HeaderType.itemsize:
        raise DataError(f"{bad} ({size} bytes); {WRITE_HINT}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise DataError(f"{bad} (format version {header['version']}, this ffcv reads "
                        f"{CURRENT_VERSION}); {WRITE_HINT}")
    table_bytes = size - int(header["alloc_table_ptr"])
    if header["num_samples"] == 0 or table_bytes <= 0 or table_bytes % ALLOC_TABLE_TYPE.itemsize:
        raise DataError(f"{bad} (no complete allocation table: the write was interrupted or "
                        f"the file was cut); {WRITE_HINT}")
    try:
        reader = Reader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing
        raise DataError(f"{bad} ({type(e).__name__}: {e}); {WRITE_HINT}") from None

    fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    for name, kind in EXPECTED_FIELDS.items():
        if fields.get(name) != kind:
            raise DataError(f"{path}: needs field {name!r} of type {kind}, file has "
                            f"{fields}; {WRITE_HINT}")

    num_samples = int(reader.num_samples)
    if len(reader.metadata) != num_samples:
        raise DataError(f"{bad} (metadata for {len(reader.metadata)} of {num_samples} samples); {WRITE_HINT}")
    table = reader.alloc_table
    if (table["ptr"] + table["size"]).max() > size or np.unique(table["sample_id"]).size != num_samples:
        raise DataError(f"{bad} (allocation table points outside the file or misses samples); {WRITE_HINT}")
    columns = reader.metadata.dtype.names  # unnamed in ffcv: f0, f1, ... in field order
    images = reader.metadata[columns[reader.field_names.index("image")]]
    labels = reader.metadata[columns[reader.field_names.index("label")]]
    if images["height"].min() == 0 or images["width"].min() == 0 or images["mode"].max() > 1:
        raise DataError(f"{bad} (image records with zero size or unknown storage mode); {WRITE_HINT}")
    if labels.min() < 0:
        raise DataError(f"{path}: negative label {labels.min()}; labels must be class indices; {WRITE_HINT}")
    return BetonInfo(path=str(path), num_samples=num_samples, num_classes=int(labels.max()) + 1,
                     max_side=int(max(images["height"].max(), images["width"].max())),
                     field_names=tuple(fields))
