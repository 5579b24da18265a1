"""Convert a torchvision-ImageFolder layout (`<split>/<class>/<image>`) to .beton files.

Class index = position of the class folder in the sorted list of class folder names, as
in torchvision, so labels match models and tools trained on the folder directly.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .manifest import SPLITS, Manifest
from .writer import WriteSettings, staged_write, write_beton

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def find_classes(split_dirs: list[Path]) -> list[str]:
    """Sorted class folder names over all splits (a class missing from val still counts)."""
    names = {entry.name for d in split_dirs for entry in os.scandir(d) if entry.is_dir()}
    if not names:
        raise DataError(f"{', '.join(map(str, split_dirs))}: no class folders; "
                        f"expected <split>/<class>/<image>.jpg")
    return sorted(names)


def list_images(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) for every image under split_dir, in a fixed (sorted) order."""
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for class_name in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
        for root, _, files in sorted(os.walk(split_dir / class_name, followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(root, name), index[class_name]))
    if not samples:
        raise DataError(f"{split_dir}: no images ({'/'.join(IMAGE_EXTENSIONS)}); "
                        f"expected {split_dir}/<class>/<image>.jpg")
    return samples


@dataclass
class FolderImages:
    """Indexable (image, label) source for ffcv's DatasetWriter.

    A file PIL cannot read does not raise: an exception inside a writer worker process
    hangs ffcv's writer. Its path goes to `error_log` (one line per file, appended by all
    worker processes) and a 1x1 placeholder is written; the caller checks the log.
    """

    samples: list[tuple[str, int]]
    """(path, label) pairs, from list_images."""
    error_log: str
    """File that collects the paths of unreadable images."""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB")), label
        except Exception as e:  # noqa: BLE001 - any decode failure is reported, not raised
            with open(self.error_log, "a") as log:
                log.write(f"{path}: {type(e).__name__}: {e}".replace("\n", " ") + "\n")
            return np.zeros((1, 1, 3), np.uint8), label


def write_image_folder(src: str | os.PathLike, out: str | os.PathLike, settings: WriteSettings,
                       overwrite: bool = False) -> Manifest:
    """Write `src/train` and `src/val` (whichever exist) to `out/{split}.beton` + manifest.json."""
    src = Path(src).resolve()
    split_dirs = {s: src / s for s in SPLITS if (src / s).is_dir()}
    if not split_dirs:
        raise DataError(f"{src}: has neither train/ nor val/; expected {src}/train/<class>/<image>.jpg")
    classes = find_classes(list(split_dirs.values()))
    samples = {s: list_images(d, classes) for s, d in split_dirs.items()}
    manifest = Manifest(source=str(src), classes=classes,
                        counts={s: len(v) for s, v in samples.items()}, settings=asdict(settings))
    with staged_write(out, manifest, overwrite) as stage:
        error_log = stage.out_dir / f".unreadable-{os.getpid()}.txt"
        try:
            for split, split_samples in samples.items():
                print(f"writing {split}: {len(split_samples)} images, {len(classes)} classes "
                      f"-> {Path(out) / (split + '.beton')}", flush=True)
                write_beton(FolderImages(split_samples, str(error_log)), stage.path(split), settings)
            if error_log.exists():
                bad = error_log.read_text().splitlines()
                raise DataError(f"{len(bad)} unreadable image(s), nothing written; first: {bad[0]}; "
                                f"remove or replace them and run again")
        finally:
            error_log.unlink(missing_ok=True)
    return manifest
