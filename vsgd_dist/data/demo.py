"""Built-in demo data: scikit-learn's digits (1797 real 8x8 scans, 10 classes) as 32x32 RGB.

Small enough to write in seconds and train on CPU, real enough that accuracy means
something. Written once per cache folder; concurrent ranks or jobs take a file lock, the
first writes, the others wait and reuse.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .manifest import DatasetFiles, Manifest, open_dataset_dir, read_manifest

SOURCE = "sklearn.datasets.load_digits"
SIDE = 32
VAL_COUNT = 297
SPLIT_SEED = 0


def default_cache_dir() -> Path:
    """$VSGD_DIST_CACHE/digits, else ~/.cache/vsgd-dist/digits."""
    root = os.environ.get("VSGD_DIST_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vsgd-dist") / "digits"


def ensure_demo_data(cache_dir: str | os.PathLike | None = None) -> DatasetFiles:
    """The digits dataset files, written first if the cache folder lacks them."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _complete(folder):
            # ffcv's writer starts worker processes, which a daemonic process (a rank started
            # by multiprocessing) may not do; a fresh interpreter always can.
            code = f"from {__name__} import write_demo; write_demo({str(folder)!r})"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise DataError(f"{folder}: writing the digits demo failed ({last}); "
                                f"check that the folder is writable or set VSGD_DIST_CACHE")
    return open_dataset_dir(folder)


def _complete(folder: Path) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and all((folder / f"{s}.beton").is_file() for s in manifest.counts)


@dataclass
class ArrayImages:
    """Indexable (image, label) source over in-memory arrays, for ffcv's DatasetWriter."""

    images: np.ndarray
    """uint8 array (N, H, W, 3)."""
    labels: np.ndarray
    """int array (N,)."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def digits_splits() -> dict[str, ArrayImages]:
    """Deterministic stratified 1500/297 split of the digits, upscaled to SIDE px RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)  # pixel values are 0..16
    big = np.stack([np.asarray(Image.fromarray(g).resize((SIDE, SIDE), Image.BICUBIC)) for g in grey])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    train, val = train_test_split(np.arange(len(grey)), test_size=VAL_COUNT, stratify=digits.target,
                                  random_state=SPLIT_SEED)
    return {name: ArrayImages(rgb[np.sort(idx)], digits.target[np.sort(idx)])
            for name, idx in (("train", train), ("val", val))}


def write_demo(folder: str | os.PathLike) -> Manifest:
    from .writer import WriteSettings, staged_write, write_beton

    settings = WriteSettings(max_resolution=None, write_mode="raw", num_workers=2)
    splits = digits_splits()
    manifest = Manifest(source=SOURCE, classes=[str(d) for d in range(10)],
                        counts={name: len(s) for name, s in splits.items()},
                        settings={**asdict(settings), "side": SIDE, "split_seed": SPLIT_SEED})
    with staged_write(folder, manifest) as stage:
        for name, split in splits.items():
            write_beton(split, stage.path(name), settings)
    return manifest
