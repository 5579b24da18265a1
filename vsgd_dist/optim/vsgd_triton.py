"""Fused VSGD on CUDA: one Triton launch updates every tensor of a list.

A launch per tensor costs more host time than the update itself: on an H200, ResNet-50's
161 tensors took 30.6 ms per step through one torch.compile'd kernel each, against 0.9 ms for
torch's fused AdamW. Here a table of pointers (param, grad, mug, bg, bhg, numel per tensor)
lives on the device, and each Triton program updates one block of one tensor; the optimizer
rebuilds the table only when a pointer changes (a step with new gradient buffers), and it is
then copied from pinned memory without making the host wait. A flat ZeRO shard is the one-tensor case.
Measured on an H200: ResNet-50's list 1.5 ms (AdamW 1.0, both mostly host time), one flat
43M-element shard 0.51 ms (AdamW 0.52; 3 TB/s).

The arithmetic is the C++ kernel's (`vsgd_cpu.SOURCE`) in the state's dtype (fp32): one
division shared by mu and sigma2, parameters read and written in their own dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vsgd_dist.optim.host_rows import host_rows_to_device

BLOCK = 1024
"""Elements per program. Measured on an H200 (bench/vsgd_triton_configs.py), one ViT-B/16
half shard: 0.51 ms at 1024 elements and 4 warps, 0.99 ms at 2048, 1.35 ms at 4096."""
NUM_WARPS = 4

_TL_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED = frozenset(_TL_TYPES)
"""Parameter and gradient dtypes the kernel reads and writes; the state is fp32."""


@triton.jit
def _vsgd_blocks(table, block_tensor, block_start, lr, decay, inv_a, bg0, bh0, rho1, keep1, rho2, keep2, eps,
                 bg_first, bh_first, sign, first, PARAM: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = table + tl.load(block_tensor + pid).to(tl.int64) * 6  # param, grad, mug, bg, bhg, numel
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(row + 5)
    param_ptr = tl.load(row).to(tl.pointer_type(PARAM)) + offsets
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD)) + offsets
    mug_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32)) + offsets
    bg_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32)) + offsets
    bhg_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32)) + offsets

    p = tl.load(param_ptr, mask=mask).to(tl.float32) * decay
    g = tl.load(grad_ptr, mask=mask).to(tl.float32) * sign
    m = tl.load(mug_ptr, mask=mask)
    bg = tl.load(bg_ptr, mask=mask, other=1.0)  # masked lanes: no division by zero
    bhg = tl.load(bhg_ptr, mask=mask, other=1.0)
    b = bg * (1.0 - first) + first * bg_first  # at t = 1 bg is 0: B is the prior's
    h = bhg * (1.0 - first) + first * bh_first
    inv_bsum = 1.0 / (b + h)
    mu = (g * b + m * h) * inv_bsum
    sigma2 = b * h * inv_bsum * inv_a
    tl.store(bg_ptr, bg * keep1 + rho1 * ((mu - m) * (mu - m) + sigma2 + bg0), mask=mask)
    tl.store(bhg_ptr, bhg * keep2 + rho2 * ((mu - g) * (mu - g) + sigma2 + bh0), mask=mask)
    tl.store(mug_ptr, mu, mask=mask)
    tl.store(param_ptr, (p - lr * mu / (tl.sqrt_rn(mu * mu + sigma2) + eps)).to(PARAM, fp_downcast_rounding="rtne"),
             mask=mask)


class TritonTable:
    """The device-side pointer table and block map of one list of tensors (param, grad, mug,
    bg, bhg per tensor, of one dense layout; the state fp32); `vsgd_fused.KeptTable` keeps it."""

    def __init__(self, operands: list[tuple[torch.Tensor, ...]]):
        self.block = BLOCK
        self.param_type = _TL_TYPES[operands[0][0].dtype]
        self.grad_type = _TL_TYPES[operands[0][1].dtype]
        rows, tensor_of_block, start_of_block = [], [], []
        for index, tensors in enumerate(operands):
            numel = tensors[0].numel()
            rows += [*(t.data_ptr() for t in tensors), numel]
            starts = range(0, numel, self.block)
            tensor_of_block += [index] * len(starts)
            start_of_block += starts
        self.blocks = len(tensor_of_block)
        self.table, self.block_tensor, self.block_start = host_rows_to_device(
            (rows, tensor_of_block, start_of_block), (torch.int64, torch.int32, torch.int64), operands[0][0].device)

    def launch(self, scalars: tuple[float, ...], first: bool) -> None:
        _vsgd_blocks[(self.blocks,)](self.table, self.block_tensor, self.block_start, *scalars, float(first),
                                     PARAM=self.param_type, GRAD=self.grad_type, BLOCK=self.block,
                                     num_warps=NUM_WARPS)
