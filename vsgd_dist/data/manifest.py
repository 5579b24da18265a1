"""`manifest.json`: what a folder of .beton files holds and how it was written.

The trainer reads the class names from it; the writer compares it before writing so that
one dataset never silently replaces another.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from .errors import DataError

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Manifest:
    source: str
    """Where the images came from: an absolute folder path, or a named built-in dataset."""
    classes: list[str]
    """Class names; a label is the index of its class in this list (sorted folder names)."""
    counts: dict[str, int]
    """Number of images per written split, e.g. {"train": 1500, "val": 297}."""
    settings: dict = field(default_factory=dict)
    """The writer settings used (resolution, write mode, JPEG quality, ...)."""
    ffcv_version: str = field(default_factory=lambda: version("ffcv"))
    """Version of the ffcv package that wrote the files."""

    def same_dataset(self, other: "Manifest") -> bool:
        """Same images and labels, whatever the write settings."""
        return (self.source, self.classes, self.counts) == (other.source, other.classes, other.counts)


def read_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The folder's manifest, or None when it has none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return Manifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete the folder and write it again") from None


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    """Write atomically: a reader sees the old manifest or the new one, never half of one."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class DatasetFiles:
    """A written dataset folder: its .beton files and what they hold. Only the splits the
    manifest lists exist for readers (a stray file of an older dataset is never read)."""

    folder: Path
    """The dataset folder."""
    manifest: Manifest
    """Classes, counts and write settings."""

    @property
    def train(self) -> Path:
        return self.split("train")

    @property
    def val(self) -> Path:
        return self.split("val")

    def split(self, name: str) -> Path:
        """`name`.beton (checked when a loader is built), or DataError if the manifest does not list it."""
        if name not in self.manifest.counts:
            raise DataError(f"{self.folder}: the dataset has no {name} split (manifest.json lists "
                            f"{', '.join(self.manifest.counts)}); write it again from a source folder "
                            f"with {name}/ in it")
        return self.folder / f"{name}.beton"


def open_dataset_dir(folder: str | os.PathLike) -> DatasetFiles:
    """The dataset in `folder`, or DataError when it is not a written dataset folder."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder}: no {MANIFEST_NAME}, so not a dataset folder; write one with "
                        f"`python -m launch data write --src DIR --out {folder}`")
    return DatasetFiles(folder=Path(folder), manifest=manifest)
