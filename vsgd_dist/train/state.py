"""Random-number-generator state of a process, for exact resume."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    """Python, numpy, torch CPU (and CUDA) generator states as tensors and plain values,
    so that `torch.load(weights_only=True)` can read them back."""
    state = {"python": _python_state(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _python_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
