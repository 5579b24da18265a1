"""Progressive resizing: small train crops early (fast epochs), full size at the end."""
from __future__ import annotations


def resolution_at_epoch(epoch: int, start_res: int, end_res: int, start_ramp: int, end_ramp: int,
                        step: int = 32) -> int:
    """Train crop size for `epoch`: start_res up to start_ramp, end_res from end_ramp on, and in
    between a linear ramp rounded to a multiple of `step` (as in ffcv-imagenet)."""
    if epoch <= start_ramp:
        return start_res
    if epoch >= end_ramp:
        return end_res
    res = start_res + (end_res - start_res) * (epoch - start_ramp) / (end_ramp - start_ramp)
    return max(step, round(res / step) * step)
