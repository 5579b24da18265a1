"""log(x) and cos(2 pi t) as straight-line float64 arithmetic that LLVM vectorizes.

numba calls libm for math.log and math.cos, one element at a time; with no vector math
library behind numba, a loop holding them stays scalar. These are plain polynomials with
selects instead of branches (and numpy's error model, so a division is not a branch either),
so a loop over them compiles to SIMD code. Both are accurate to a few units in the last
place, not correctly rounded: callers that need libm's exact value (draws.approx_normals
explains which) must recompute the rare values where the last bits can matter.
"""
from __future__ import annotations

import math

import numba
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_TWO_PI = 2.0 * math.pi
_ATANH_SERIES = tuple(1.0 / (2 * k + 1) for k in range(10, -1, -1))
"""1/21, 1/19, ..., 1/3, 1: ln m = 2 s (1 + s^2/3 + s^4/5 + ...), highest power first."""
_COS_SERIES = tuple((-1) ** k / math.factorial(2 * k) for k in range(8, -1, -1))
"""x^16/16!, -x^14/14!, ..., 1: cos x, highest power first (as polynomials in x^2)."""
_SIN_SERIES = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(8, -1, -1))
"""x^17/17!, ..., 1: sin x / x."""


@intrinsic
def _bits(typingctx, x):
    """The IEEE-754 bits of a float64, as an int64."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _from_bits(typingctx, bits):
    """The float64 whose IEEE-754 bits are `bits`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@numba.njit(nogil=True, inline="always", error_model="numpy")
def log(x):
    """ln(x) of a positive, normal float64: x = 2^e m with m in (sqrt(1/2), sqrt(2)], and
    ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^21."""
    bits = _bits(x)
    exponent = ((bits >> 52) & 0x7FF) - 1023
    mantissa = _from_bits((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)  # in [1, 2)
    high = mantissa > _SQRT2
    mantissa = mantissa * 0.5 if high else mantissa
    exponent = exponent + 1 if high else exponent
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = 0.0
    for coefficient in _ATANH_SERIES:
        series = series * s2 + coefficient
    return exponent * _LN2 + 2.0 * s * series


@numba.njit(nogil=True, inline="always", error_model="numpy")
def cos_2pi(t):
    """cos(2 pi t) for t in [0, 1): folded to an angle x in [0, pi/4] (every fold exact in
    float64), then the Taylor series of cos x or sin x, each to its x^16 or x^17 term."""
    t = 1.0 - t if t >= 0.5 else t  # cos(2 pi t) = cos(2 pi (1 - t))
    quarter = min(t, 0.5 - t)  # cos(2 pi t) = -cos(2 pi (0.5 - t))
    sign = 1.0 if t <= 0.25 else -1.0
    x = _TWO_PI * min(quarter, 0.25 - quarter)  # cos(2 pi q) = sin(2 pi (0.25 - q))
    x2 = x * x
    cos, sin = 0.0, 0.0
    for k in range(len(_COS_SERIES)):
        cos = cos * x2 + _COS_SERIES[k]
        sin = sin * x2 + _SIN_SERIES[k]
    return sign * (cos if quarter <= 0.125 else sin * x)
