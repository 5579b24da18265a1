"""Fused IVON on CUDA: one Triton launch draws a whole group's sample, one steps a bucket.

As `vsgd_triton`, a device-side table holds the pointers and sizes of every range (and, for
the sample, the global index of its first element); each program handles one block of one
range; `ivon_fused.FusedIVON` keeps the table while the addresses hold. The noise is
`noise.normal_from_index`: Philox4x32-10 (the rounds of Triton's `tl.randint4x`, written here
so the interpreter runs them too) per element's counter, then the float32 Box-Muller of `noise` with its
constants. Launched without fp fusion, with IEEE division and square root, every float
operation rounds on its own, so the interpreter gives the C++ kernel's bits, and a GPU should
too; the step is the C++ kernel's sequence of operations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vsgd_dist.optim.host_rows import host_rows_to_device
from vsgd_dist.optim.noise import CONSTANTS as C

BLOCK = 1024
NUM_WARPS = 4
SUPPORTED = frozenset({torch.float32})
"""Parameter dtypes the kernels take (state of the same dtype); fp64 takes the unfused path."""


@triton.jit
def _log_unit(u):
    bits = u.to(tl.uint32, bitcast=True)
    exponent = (bits >> 23).to(tl.int32) - 126
    mantissa = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = mantissa < SQRT_HALF
    exponent = exponent - small.to(tl.int32)
    x = tl.where(small, mantissa + mantissa, mantissa) - 1.0
    z = x * x
    y = x * LOG0 + LOG1
    y = y * x + LOG2
    y = y * x + LOG3
    y = y * x + LOG4
    y = y * x + LOG5
    y = y * x + LOG6
    y = y * x + LOG7
    y = y * x + LOG8
    y = y * x
    y = y * z
    e = exponent.to(tl.float32)
    y = y + e * LN2_LO
    y = y + z * -0.5
    x = x + y
    return x + e * LN2_HI


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (`noise.philox4x32`) of uint32 counters under the uint32 key (k0, k1)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo0 = c0 * 0xD2511F53
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _normal(index, seed, step, sample):
    """noise.normal_from_index for int64 `index` (seed int64, step and sample int32)."""
    group = ((index >> 6) << 4) | (index & 15)
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    c2 = (index * 0 + step).to(tl.uint32)
    c3 = (index * 0 + sample).to(tl.uint32)
    seed = seed.to(tl.uint64)
    k0 = (index * 0 + (seed & 0xFFFFFFFF)).to(tl.uint32)
    k1 = (index * 0 + (seed >> 32)).to(tl.uint32)
    w0, w1, w2, w3 = _philox(c0, c1, c2, c3, k0, k1)
    second_pair = ((index >> 5) & 1) != 0
    a = tl.where(second_pair, w2, w0)
    b = tl.where(second_pair, w3, w1)
    u1 = ((a >> 8) + 1).to(tl.float32) * TWO_M24
    radius = tl.sqrt_rn(_log_unit(u1) * -2.0)
    fraction = ((b >> 6) & 0xFFFFFF).to(tl.float32) * TWO_M24
    upper = fraction >= 0.5
    x = tl.where(upper, 1.0 - fraction, fraction) * HALF_PI
    z = x * x
    s = z * SIN0 + SIN1
    s = s * z + SIN2
    s = s * z
    s = s * x
    s = s + x
    k = z * COS0 + COS1
    k = k * z + COS2
    k = k * z
    k = k * z
    k = k - z * 0.5
    k = k + 1.0
    sin_f = tl.where(upper, k, s)
    cos_f = tl.where(upper, s, k)
    quadrant = b >> 30
    odd = ((index >> 4) & 1) != 0
    use_sin = odd ^ ((quadrant & 1) != 0)
    value = tl.where(use_sin, sin_f, cos_f)
    negative = tl.where(odd, quadrant >= 2, (quadrant == 1) | (quadrant == 2))
    return radius * tl.where(negative, -value, value)


@triton.jit
def _sample_blocks(table, block_range, block_start, seed, step, sample, ess, wd, KEEP_MEAN: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = table + tl.load(block_range + pid).to(tl.int64) * 6  # param, h, mean, eps, numel, first index
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(row + 4)
    param_ptr = tl.load(row).to(tl.pointer_type(tl.float32)) + offsets
    h_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32)) + offsets
    mean_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32)) + offsets
    eps_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32)) + offsets
    z = _normal(tl.load(row + 5) + offsets, seed, step, sample)
    h = tl.load(h_ptr, mask=mask, other=1.0)
    sigma = tl.div_rn(1.0, tl.sqrt_rn((h + wd) * ess))
    e = z * sigma
    if KEEP_MEAN:
        m = tl.load(param_ptr, mask=mask)
        tl.store(mean_ptr, m, mask=mask)
    else:
        m = tl.load(mean_ptr, mask=mask)
    tl.store(eps_ptr, e, mask=mask)
    tl.store(param_ptr, m + e, mask=mask)


@triton.jit
def _step_blocks(table, block_range, block_start, lr, ess, wd, beta1, keep1, beta2, keep2, c, bias, clip, count,
                 SINGLE: tl.constexpr, PRICE: tl.constexpr, AVERAGED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = table + tl.load(block_range + pid).to(tl.int64) * 7  # param, mean, grad, stat, m, h, numel
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(row + 6)
    param_ptr = tl.load(row).to(tl.pointer_type(tl.float32)) + offsets
    mean_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32)) + offsets
    grad_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32)) + offsets
    stat_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32)) + offsets
    m_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32)) + offsets
    h_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32)) + offsets
    g = tl.load(grad_ptr, mask=mask)
    st = tl.load(stat_ptr, mask=mask)
    if SINGLE:
        st = g * st
    if AVERAGED:
        g = tl.div_rn(g, count)
        st = tl.div_rn(st, count)
    h = tl.load(h_ptr, mask=mask, other=1.0)
    hd = h + wd
    if PRICE:
        hhat = (hd * ess) * st
    else:
        hhat = st * ess
    corr = h - hhat
    corr = corr * corr
    corr = tl.div_rn(corr, hd)
    corr = corr * c
    m = tl.load(m_ptr, mask=mask) * beta1 + g * keep1
    h_new = h * beta2 + hhat * keep2 + corr
    w = tl.load(mean_ptr, mask=mask)
    step = tl.div_rn(m, bias)
    step = step + w * wd
    step = tl.div_rn(step, h_new + wd)
    step = tl.minimum(tl.maximum(step, -clip), clip)
    tl.store(m_ptr, m, mask=mask)
    tl.store(h_ptr, h_new, mask=mask)
    tl.store(param_ptr, w - step * lr, mask=mask)


# The noise constants as Triton globals (a @triton.jit function reads module-level constexprs).
SQRT_HALF, LN2_LO, LN2_HI = tl.constexpr(C["sqrt_half"]), tl.constexpr(C["ln2_lo"]), tl.constexpr(C["ln2_hi"])
LOG0, LOG1, LOG2, LOG3, LOG4, LOG5, LOG6, LOG7, LOG8 = (tl.constexpr(C[f"log{k}"]) for k in range(9))
SIN0, SIN1, SIN2 = (tl.constexpr(C[f"sin{k}"]) for k in range(3))
COS0, COS1, COS2 = (tl.constexpr(C[f"cos{k}"]) for k in range(3))
HALF_PI, TWO_M24 = tl.constexpr(C["half_pi"]), tl.constexpr(C["two_m24"])


def _block_map(numels: list[int], rows: list[list[int]], device) -> tuple:
    tensor_of_block, start_of_block = [], []
    for index, numel in enumerate(numels):
        starts = range(0, numel, BLOCK)
        tensor_of_block += [index] * len(starts)
        start_of_block += starts
    table, block_range, block_start = host_rows_to_device(
        ([x for row in rows for x in row], tensor_of_block, start_of_block), (torch.int64, torch.int32, torch.int64),
        device)
    return len(tensor_of_block), table, block_range, block_start


class TritonSampleTable:
    """The sample kernel's device table for one list of ranges: (param, h, mean, eps) 1-D
    fp32 views and the global index of each range's first element."""

    def __init__(self, ranges: list[tuple[torch.Tensor, ...]], firsts: list[int]):
        numels = [r[0].numel() for r in ranges]
        rows = [[*(t.data_ptr() for t in r), n, first] for r, n, first in zip(ranges, numels, firsts)]
        self.blocks, self.table, self.block_range, self.block_start = _block_map(numels, rows, ranges[0][0].device)

    def launch(self, seed: int, step: int, sample: int, ess: float, wd: float, keep_mean: bool) -> None:
        _sample_blocks[(self.blocks,)](self.table, self.block_range, self.block_start, seed, step, sample, ess, wd,
                                       KEEP_MEAN=keep_mean, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


class TritonStepTable:
    """The step kernel's device table for one list: (param, mean, grad, stat, m, h) 1-D fp32 views."""

    def __init__(self, operands: list[tuple[torch.Tensor, ...]]):
        numels = [o[0].numel() for o in operands]
        rows = [[*(t.data_ptr() for t in o), n] for o, n in zip(operands, numels)]
        self.blocks, self.table, self.block_range, self.block_start = _block_map(numels, rows,
                                                                                 operands[0][0].device)

    def launch(self, scalars: tuple[float, ...], single: bool, price: bool) -> None:
        """`scalars`: `ivon_fused.STEP_SCALARS`."""
        _step_blocks[(self.blocks,)](self.table, self.block_range, self.block_start, *scalars, SINGLE=single,
                                     PRICE=price, AVERAGED=scalars[-1] != 1.0, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                     enable_fp_fusion=False)
