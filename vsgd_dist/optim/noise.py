"""Counter-based standard-normal draws: z = f(seed, step, sample, element index) only.

A ZeRO rank, an FSDP2 shard and an unsharded run all hold different pieces of the same
parameters. With a stateful generator each would draw different noise; here element `i`
of step `t`, Monte-Carlo sample `s` always gets the same z, whichever process draws it and
whatever slice it draws, so runs at different world sizes can be compared bit for bit.

The definition (this module is its reference; IVON's fused kernels compute the same bits):

- Elements come in chunks of 64 (`i >> 6`), each drawn from 16 Philox counters: element i
  takes word `(i >> 4) & 3` of counter `g = (i >> 6) * 16 + (i & 15)`, so a chunk's words lie
  in memory order (word 0 of the 16 counters, then word 1, ...) and a vectorized kernel needs no
  shuffles. Philox4x32-10 (Salmon et al., SC'11; Random123's constants) of the counter (g low
  32 bits, g high 32 bits, step, sample) under the key (seed low, seed high) gives the four
  32-bit words w0..w3: one Philox per four elements.
- Words (w0, w1) and (w2, w3) are Box-Muller pairs (a, b): r = sqrt(-2 log u1) with
  u1 = ((a >> 8) + 1) * 2^-24 in (0, 1], the angle a quarter turn times (b >> 30) plus
  (b >> 6 & 0xFFFFFF) * 2^-24 of a quarter turn; the element of word w0 or w2 takes r cos,
  that of w1 or w3 r sin.
- In float32 only, with polynomials for log, sin and cos (Cephes' logf, sinf, cosf
  coefficients, rounded to float32) and IEEE +, -, *, / and sqrt, each rounded on its own:
  the torch ops below, a C++ loop built with -ffp-contract=off and a Triton kernel launched
  without fp fusion all give the same bits. A float64 run gets the float32 draw, widened.

The uniforms have 24 bits, so |z| <= sqrt(-2 log 2^-24) = 5.77 (P(|N(0,1)| > 5.77) is 8e-9).
The polynomials are within a few float32 ulps of log, sin and cos on their ranges.
"""
from __future__ import annotations

import torch

__all__ = ["philox4x32", "standard_normal", "normal_from_index", "check_counter", "sqrt_rn", "CONSTANTS"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10

CONSTANTS = {name: float.fromhex(value) for name, value in {
    # log(x) on [sqrt(1/2) - 1, sqrt(2) - 1] after x -> mantissa - 1 (Cephes logf), high degree first
    "log0": "0x1.2043760000000p-4", "log1": "-0x1.d7a3700000000p-4", "log2": "0x1.de4a340000000p-4",
    "log3": "-0x1.fcba9e0000000p-4", "log4": "0x1.23d37e0000000p-3", "log5": "-0x1.555ca00000000p-3",
    "log6": "0x1.999d580000000p-3", "log7": "-0x1.fffff80000000p-3", "log8": "0x1.5555540000000p-2",
    "ln2_lo": "-0x1.bd01060000000p-13", "ln2_hi": "0x1.6300000000000p-1", "sqrt_half": "0x1.6a09e60000000p-1",
    # sin and cos on [0, pi/4] (Cephes sinf, cosf)
    "sin0": "-0x1.9943f20000000p-13", "sin1": "0x1.11073c0000000p-7", "sin2": "-0x1.5555460000000p-3",
    "cos0": "0x1.99eb9c0000000p-16", "cos1": "-0x1.6c0c340000000p-10", "cos2": "0x1.55554a0000000p-5",
    "half_pi": "0x1.921fb60000000p+0", "two_m24": "0x1.0p-24",
}.items()}
"""The float32 constants of the definition (each exactly a float32), shared by every kernel."""


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


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """sqrt rounded as IEEE demands for float32 (torch's own float32 sqrt is off by an ulp on
    about 0.5% of inputs on some CPUs): through float64, which rounds back exactly."""
    return x.double().sqrt_().to(x.dtype) if x.dtype == torch.float32 else x.sqrt()


def _log(u: torch.Tensor) -> torch.Tensor:
    """log(u) for float32 u in (0, 1] (Cephes logf's reduction and polynomial)."""
    c = CONSTANTS
    bits = u.view(torch.int32)
    exponent = (bits >> 23) - 126
    mantissa = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)  # [1/2, 1)
    small = mantissa < c["sqrt_half"]
    exponent = exponent - small.to(torch.int32)
    x = torch.where(small, mantissa + mantissa, mantissa) - 1.0
    z = x * x
    y = x * c["log0"] + c["log1"]
    for k in range(2, 9):
        y = y * x + c[f"log{k}"]
    y = y * x
    y = y * z
    e = exponent.to(torch.float32)
    y = y + e * c["ln2_lo"]
    y = y + z * -0.5
    x = x + y
    return x + e * c["ln2_hi"]


def _sin_cos(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin(x), cos(x) for float32 x in [0, pi/4] (Cephes sinf, cosf)."""
    c = CONSTANTS
    z = x * x
    s = z * c["sin0"] + c["sin1"]
    s = s * z + c["sin2"]
    s = s * z
    s = s * x
    s = s + x
    k = z * c["cos0"] + c["cos1"]
    k = k * z + c["cos2"]
    k = k * z
    k = k * z
    k = k - z * 0.5
    k = k + 1.0
    return s, k


def normal_from_index(index: torch.Tensor, seed, step, sample) -> torch.Tensor:
    """float32 standard normals for int64 element indices (seed, step, sample: ints or 0-d
    int64 tensors)."""
    group = ((index >> 6) << 4) | (index & 15)
    w0, w1, w2, w3 = philox4x32(group & _MASK32, group >> 32, step & _MASK32, sample & _MASK32,
                                seed & _MASK32, (seed >> 32) & _MASK32)
    second_pair = ((index >> 5) & 1).bool()
    a = torch.where(second_pair, w2, w0)
    b = torch.where(second_pair, w3, w1)
    u1 = ((a >> 8) + 1).to(torch.float32) * CONSTANTS["two_m24"]  # (0, 1]: log is finite
    radius = sqrt_rn(_log(u1) * -2.0)
    fraction = ((b >> 6) & 0xFFFFFF).to(torch.float32) * CONSTANTS["two_m24"]  # [0, 1) of a quarter turn
    upper = fraction >= 0.5
    sin_r, cos_r = _sin_cos(torch.where(upper, 1.0 - fraction, fraction) * CONSTANTS["half_pi"])
    sin_f, cos_f = torch.where(upper, cos_r, sin_r), torch.where(upper, sin_r, cos_r)  # of phi
    quadrant = b >> 30  # the angle is quadrant * pi/2 + phi
    odd = ((index >> 4) & 1).bool()
    # even: cos(angle) = cos, -sin, -cos, sin phi; odd: sin(angle) = sin, cos, -sin, -cos phi
    use_sin = odd ^ (quadrant & 1).bool()
    value = torch.where(use_sin, sin_f, cos_f)
    negative = torch.where(odd, quadrant >= 2, (quadrant == 1) | (quadrant == 2))
    return radius * torch.where(negative, -value, value)


def standard_normal(seed: int, step: int, sample: int, start: int, numel: int,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z for global elements [start, start + numel): equal, element for element, to the same
    slice of any larger draw with the same seed, step and sample."""
    check_counter(seed, step, sample, start, numel)
    index = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    return normal_from_index(index, seed, step, sample).to(dtype)


def check_counter(seed: int, step: int, sample: int, start: int, numel: int) -> None:
    """Raise unless the draw's counter lies in the generator's range."""
    for name, value, bits in (("seed", seed, 63), ("step", step, 32), ("sample", sample, 32)):
        if not 0 <= value < 2 ** bits:
            raise ValueError(f"noise: {name}={value} must be in [0, 2**{bits})")
    if start < 0 or numel < 0 or start + numel > 2 ** 62:
        raise ValueError(f"noise: start={start}, numel={numel}: elements [start, start + numel) "
                         "must lie in [0, 2**62)")
