"""Shared by the tests in tests/gpu."""
from __future__ import annotations

import torch


def gpu_ranks(max_ranks: int) -> int:
    """One rank per visible GPU, at most `max_ranks`; 1 on a one-GPU machine."""
    return max(1, min(torch.cuda.device_count(), max_ranks))
