"""tests/gpu: the CUDA/NCCL path on a real GPU (bash bench/gpu_check.sh runs them).

Without CUDA every test here is skipped at collection, with one reason; nothing in these
modules touches CUDA at import time. With CUDA, tests that need several ranks use one rank
per visible GPU (`gpu_helpers.gpu_ranks`), or one rank on NCCL on a one-GPU machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gpu_helpers, for these modules and the ranks they spawn

NO_CUDA = "no CUDA device: tests/gpu run on a GPU machine (bash bench/gpu_check.sh)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
