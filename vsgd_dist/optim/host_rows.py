"""Small host-made tensors (kernel tables, counters, scalars) put on the device without making
the host wait, for the optimizers' fused CUDA paths."""
from __future__ import annotations

import torch


def host_rows_to_device(rows: tuple, dtypes: tuple, device: torch.device) -> list[torch.Tensor]:
    """Small host-made tensors (one per row, of the matching dtype) on `device` without making
    the host wait for the device (torch.tensor(..., device="cuda") copies from pageable memory
    and waits): on CUDA copied from pinned memory, which torch's caching host allocator keeps
    until the copy has run."""
    host = [torch.tensor(row, dtype=dtype) for row, dtype in zip(rows, dtypes)]
    if device.type != "cuda":
        return [t.to(device) for t in host]
    return [t.pin_memory().to(device, non_blocking=True) for t in host]
