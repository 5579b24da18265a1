"""Keyed random draws for the decoders: every number is a hash (splitmix64) of a key and a
draw number, never the state of a generator, so it does not depend on the decoding thread,
the batch an image lands in, the world size, or how often anything else drew before.

A draw is `uniform(key, n)`: the n-th number of the stream `key` names. `image_key(seed,
epoch, index)` names an image's stream in one epoch; `subkey(key, tag)` splits it into
independent streams, one per augmentation, so adding one never moves another's draws.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from . import vector_math

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True, cache=True)
def _mix(z):
    """splitmix64's finalizer: a bijection of uint64 whose outputs look independent."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def image_key(seed, epoch, index):
    """The key all draws of one image in one epoch derive from."""
    return _mix(_mix(_mix(np.uint64(seed) + _GOLDEN) ^ np.uint64(epoch)) ^ np.uint64(index))


@numba.njit(nogil=True, cache=True)
def subkey(key, tag):
    """An independent stream of `key` for one use (`tag`: a constant per augmentation)."""
    return _mix(key ^ _mix(np.uint64(tag) + _GOLDEN))


@numba.njit(nogil=True, cache=True)
def uniform(key, draw):
    """Draw number `draw` of an image's stream, uniform in [0, 1) (53 random bits)."""
    return float(_mix(key + np.uint64(draw + 1) * _GOLDEN) >> np.uint64(11)) * 2.0 ** -53


@numba.njit(nogil=True, cache=True)
def normal(key, draw):
    """A standard normal from draws `draw` and `draw + 1` (Box-Muller)."""
    return math.sqrt(-2.0 * math.log(1.0 - uniform(key, draw))) * math.cos(2.0 * math.pi * uniform(key, draw + 1))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def approx_normals(key, first, out):
    """out[i] = normal(key, 2 * (first + i)) to within 1e-13 (measured: 3e-15), in SIMD code
    (vector_math's log and cos in place of libm's). Not bitwise normal(): a caller that
    rounds the value must recompute normal() where the value lies that close to a rounding
    boundary."""
    for i in range(out.size):
        draw = 2 * (first + i)
        u1 = float(_mix(key + np.uint64(draw + 1) * _GOLDEN) >> np.uint64(11)) * 2.0 ** -53
        u2 = float(_mix(key + np.uint64(draw + 2) * _GOLDEN) >> np.uint64(11)) * 2.0 ** -53
        out[i] = math.sqrt(-2.0 * vector_math.log(1.0 - u1)) * vector_math.cos_2pi(u2)
