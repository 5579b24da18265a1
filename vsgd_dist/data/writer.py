"""Write (image, label) sources to FFCV .beton files, all-or-nothing.

Files are written under temporary names and renamed into place only when every split is
complete, so a crash or a bad image never leaves a half-written dataset under a real name,
and a folder holding another dataset's manifest is refused instead of overwritten.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

from .errors import DataError
from .manifest import SPLITS, Manifest, read_manifest, write_manifest

WRITE_MODES = ("jpg", "proportion", "raw", "smart")


class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


@dataclass(frozen=True)
class WriteSettings:
    """How images are stored; the knobs of ffcv-imagenet's writer."""

    max_resolution: int | None = 512
    """Longest side after resizing (smaller images are kept as they are); None keeps all."""
    write_mode: str = "proportion"
    """jpg: all JPEG; raw: all uint8 pixels; proportion: JPEG with compress_probability;
    smart: JPEG only for images whose raw size exceeds smart_threshold bytes."""
    compress_probability: float = 0.5
    """Share of images stored as JPEG in 'proportion' mode (the rest raw, faster to decode)."""
    jpeg_quality: int = 90
    """JPEG quality (1-100) of re-encoded images."""
    smart_threshold: int = 256 * 256 * 3
    """'smart' mode: raw size in bytes above which an image is stored as JPEG."""
    chunk_size: int = 100
    """Images handed to a writer process at a time."""
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Writer processes (decode + resize + encode run in parallel)."""

    def __post_init__(self):
        problems = []
        if self.write_mode not in WRITE_MODES:
            problems.append(f"write_mode {self.write_mode!r} is not one of {', '.join(WRITE_MODES)}")
        if self.max_resolution is not None and self.max_resolution < 1:
            problems.append(f"max_resolution {self.max_resolution} must be positive")
        if not 0.0 <= self.compress_probability <= 1.0:
            problems.append(f"compress_probability {self.compress_probability} must be in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality {self.jpeg_quality} must be in [1, 100]")
        if self.chunk_size < 1 or self.num_workers < 1:
            problems.append("chunk_size and num_workers must be at least 1")
        if problems:
            raise DataError("invalid write settings: " + "; ".join(problems))


def write_beton(images: ImageSource, path: str | os.PathLike, settings: WriteSettings) -> None:
    """Write one split with fields `image` (RGBImageField) and `label` (IntField)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode=settings.write_mode, max_resolution=settings.max_resolution,
                               smart_threshold=settings.smart_threshold,
                               jpeg_quality=settings.jpeg_quality,
                               compress_probability=settings.compress_probability),
        "label": IntField(),
    }
    writer = DatasetWriter(str(path), fields, num_workers=min(settings.num_workers, len(images)))
    writer.from_indexed_dataset(images, chunksize=settings.chunk_size)


@dataclass
class StagedWrite:
    """Temporary file names inside the output folder, renamed by `staged_write` on success."""

    out_dir: Path
    splits: Sequence[str]

    def path(self, split: str) -> Path:
        return self.out_dir / f".{split}.beton.tmp-{os.getpid()}"


@contextlib.contextmanager
def staged_write(out_dir: str | os.PathLike, manifest: Manifest, overwrite: bool = False) -> Iterator[StagedWrite]:
    """Yield temp paths for manifest's splits; on clean exit rename them into place, write the
    manifest, and delete the splits it does not list; on any exception delete the temp files
    and leave the folder as it was."""
    out = Path(out_dir)
    refuse_foreign_folder(out, manifest, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    stage = StagedWrite(out, list(manifest.counts))
    try:
        yield stage
    except BaseException:
        for split in stage.splits:
            stage.path(split).unlink(missing_ok=True)
        raise
    for split in stage.splits:
        os.replace(stage.path(split), out / f"{split}.beton")
    write_manifest(out, manifest)
    for split in set(SPLITS) - set(stage.splits):  # an older dataset's split must not outlive it
        (out / f"{split}.beton").unlink(missing_ok=True)


def refuse_foreign_folder(out: Path, manifest: Manifest, overwrite: bool) -> None:
    """Raise unless `out` is empty of datasets, holds this same dataset, or overwrite is set."""
    if overwrite or not out.exists():
        return
    existing = read_manifest(out)
    fix = f"choose an empty --out folder, delete {out}, or pass --overwrite"
    if existing is None:
        betons = sorted(p.name for p in out.glob("*.beton"))
        if betons:
            raise DataError(f"{out}: holds {', '.join(betons)} without a manifest.json; {fix}")
    elif not existing.same_dataset(manifest):
        raise DataError(f"{out}: holds a different dataset (from {existing.source}, "
                        f"{len(existing.classes)} classes, {existing.counts}); {fix}")
