"""Counter-based standard-normal draws: z = f(seed, step, sample, element index) only.

A ZeRO rank, an FSDP2 shard and an unsharded run all hold different pieces of the same
parameters. With a stateful generator each would draw different noise; here element `i`
of step `t`, Monte-Carlo sample `s` always gets the same z, whichever process draws it and
whatever slice it draws, so runs at different world sizes can be compared bit for bit.

Per element: Philox4x32-10 (Salmon et al., SC'11; Random123's constants) of the counter
(index low 32 bits, index high 32 bits, step, sample) under the key (seed low, seed high)
gives four 32-bit words; two 53-bit uniforms u1 in (0, 1], u2 in [0, 1) feed Box-Muller,
z = sqrt(-2 log u1) * cos(2 pi u2), computed in float64 and rounded to `dtype` (so fp32 and
fp64 runs see the same z up to that rounding). Only torch tensor ops: no host sync, no
Python loop over elements, the same code on CPU and CUDA. 32-bit products are split into
16-bit halves so no int64 operation overflows.
"""
from __future__ import annotations

import math

import torch

__all__ = ["philox4x32", "standard_normal", "normal_from_index"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10
_TWO_POW_M53 = 2.0 ** -53


def _mulhilo(m: int, x):
    """(high, low) 32-bit halves of m * x for 32-bit m, x, without a 64-bit overflow."""
    p_lo = (x & 0xFFFF) * m  # < 2**48
    p_hi = (x >> 16) * m  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the counter (c0..c3) under the key (k0, k1): four 32-bit words.

    Arguments are int64 tensors (broadcast together) or Python ints holding values in
    [0, 2**32); the results are int64 tensors (or ints) in the same range.
    """
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def normal_from_index(index: torch.Tensor, seed, step, sample) -> torch.Tensor:
    """float64 standard normals for int64 element indices (seed, step, sample: ints or 0-d
    int64 tensors, so a compiled caller need not recompile when they change)."""
    w0, w1, w2, w3 = philox4x32(index & _MASK32, index >> 32, step & _MASK32, sample & _MASK32,
                                seed & _MASK32, (seed >> 32) & _MASK32)
    u1 = (((w0 << 21) | (w1 >> 11)) + 1).to(torch.float64) * _TWO_POW_M53  # (0, 1]: log is finite
    u2 = ((w2 << 21) | (w3 >> 11)).to(torch.float64) * _TWO_POW_M53  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def standard_normal(seed: int, step: int, sample: int, start: int, numel: int,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z for global elements [start, start + numel): equal, element for element, to the same
    slice of any larger draw with the same seed, step and sample."""
    _check_counter(seed, step, sample, start, numel)
    index = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    return normal_from_index(index, seed, step, sample).to(dtype)


def _check_counter(seed: int, step: int, sample: int, start: int, numel: int) -> None:
    for name, value, bits in (("seed", seed, 63), ("step", step, 32), ("sample", sample, 32)):
        if not 0 <= value < 2 ** bits:
            raise ValueError(f"noise: {name}={value} must be in [0, 2**{bits})")
    if start < 0 or numel < 0 or start + numel > 2 ** 62:
        raise ValueError(f"noise: start={start}, numel={numel}: elements [start, start + numel) "
                         "must lie in [0, 2**62)")
