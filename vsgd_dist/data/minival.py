"""The minival split: a fixed, seeded part of the training set held out for tuning, so that
hyperparameters are chosen on images that are neither trained on nor the reported val set."""
from __future__ import annotations

import numpy as np

from .errors import DataError


def minival_split(num_train: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, minival indices) of a training file with `num_train` images, both
    sorted. A function of (seed, num_train) only, so every rank, world size and train.seed
    holds out the same images; a larger count holds out a superset."""
    if not 0 <= count < num_train:
        raise DataError(f"data.minival={count} must be in [0, {num_train}) (the training set's size)")
    held = np.zeros(num_train, dtype=bool)
    held[np.random.default_rng(seed).permutation(num_train)[:count]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)
