"""Fused VSGD on CPU: one call of a small C++ kernel updates every tensor of a list.

The kernel needs no torch headers (pointers and lengths), so `cpp_kernel` builds it in about
a second, once per machine. Work is cut into 64K-element items that threads take as they
finish. A `CpuTable` holds the pointer and length arrays of one list: preparing them per
tensor in Python took ~2 ms of a 26 ms ResNet-50 step, so the optimizer keeps a table while
the tensors' addresses hold (`vsgd_fused.KeptTable`), as it keeps the Triton path's device table.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from vsgd_dist.optim import cpp_kernel

# Scalars (double): lr, decay, inv_a, bg0, bh0, rho1, 1 - rho1, rho2, 1 - rho2, eps, bg_first,
# bh_first, sign; converted once to the state type, as torch converts Python scalars.
SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {
constexpr int64_t kPiece = 1 << 16;  // elements per work item shared among threads
// Software prefetch: the hardware prefetchers left the 5-stream loop ~17% short of a loop
// with the same loads and stores and no arithmetic. Each block of kBlock elements first asks
// for the cache lines kAhead elements further on. Measured on a 12.8M-element shard
// (2 threads): 8.7 ms without, 7.1 ms at 64 / 512 (7.3 at 128 / 512, 10.4 at 1024 / 1024).
constexpr int64_t kBlock = 64, kAhead = 512;

template <typename T, bool First>
void update_block(T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ mug, T* __restrict__ bg,
            T* __restrict__ bhg, int64_t n, const T* s) {
  const T lr = s[0], decay = s[1], inv_a = s[2], bg0 = s[3], bh0 = s[4], rho1 = s[5], keep1 = s[6],
          rho2 = s[7], keep2 = s[8], eps = s[9], bg_first = s[10], bh_first = s[11], sign = s[12];
  for (int64_t i = 0; i < n; ++i) {
    const T p = param[i] * decay;
    const T g = grad[i] * sign;
    const T m = mug[i];
    const T b = First ? bg_first : bg[i];
    const T h = First ? bh_first : bhg[i];
    const T inv_bsum = T(1) / (b + h);
    const T mu = (g * b + m * h) * inv_bsum;
    const T sigma2 = b * h * inv_bsum * inv_a;
    bg[i] = bg[i] * keep1 + rho1 * ((mu - m) * (mu - m) + sigma2 + bg0);
    bhg[i] = bhg[i] * keep2 + rho2 * ((mu - g) * (mu - g) + sigma2 + bh0);
    mug[i] = mu;
    param[i] = p - lr * mu / (std::sqrt(mu * mu + sigma2) + eps);
  }
}

template <typename T, bool First>
void update(T* param, const T* grad, T* mug, T* bg, T* bhg, int64_t n, const T* s) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    for (int64_t j = lo + kAhead; j < std::min(lo + kAhead + kBlock, n); j += kLine) {
      __builtin_prefetch(param + j, 1);
      __builtin_prefetch(grad + j, 0);
      __builtin_prefetch(mug + j, 1);
      __builtin_prefetch(bg + j, 1);
      __builtin_prefetch(bhg + j, 1);
    }
    update_block<T, First>(param + lo, grad + lo, mug + lo, bg + lo, bhg + lo, std::min(kBlock, n - lo), s);
  }
}

template <typename T>
void step(int64_t count, void* const* tensors, const int64_t* numels, const double* scalars, bool first,
          int threads) {
  T s[13];
  for (int k = 0; k < 13; ++k) s[k] = static_cast<T>(scalars[k]);
  std::vector<int64_t> starts(count + 1, 0);  // first work item of each tensor
  for (int64_t t = 0; t < count; ++t) starts[t + 1] = starts[t] + (numels[t] + kPiece - 1) / kPiece;
  const int64_t items = starts[count];
  // Items differ in size (a small tensor is one), so threads take them as they finish: split
  // statically by count, ResNet-50's list gave one of two threads 16M of its 25.6M elements.
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t t = std::upper_bound(starts.begin(), starts.end(), item) - starts.begin() - 1;
    const int64_t lo = (item - starts[t]) * kPiece, n = std::min(kPiece, numels[t] - lo);
    T* const* p = reinterpret_cast<T* const*>(tensors + 5 * t);
    (first ? update<T, true> : update<T, false>)(p[0] + lo, p[1] + lo, p[2] + lo, p[3] + lo, p[4] + lo, n, s);
  }
}
}  // namespace

extern "C" void vsgd_step_float(int64_t count, void* const* tensors, const int64_t* numels,
                                const double* scalars, bool first, int threads) {
  step<float>(count, tensors, numels, scalars, first, threads);
}

extern "C" void vsgd_step_double(int64_t count, void* const* tensors, const int64_t* numels,
                                 const double* scalars, bool first, int threads) {
  step<double>(count, tensors, numels, scalars, first, threads);
}
"""


@functools.cache
def library() -> ctypes.CDLL:
    built = cpp_kernel.load("vsgd", SOURCE)
    for fn in (built.vsgd_step_float, built.vsgd_step_double):
        fn.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                       ctypes.POINTER(ctypes.c_double), ctypes.c_bool, ctypes.c_int]
        fn.restype = None
    return built


class CpuTable:
    """The kernel's arguments for one list of tensors: (param, grad, mug, bg, bhg) per tensor,
    all five of the state's dtype (fp32 or fp64) and of one dense layout."""

    def __init__(self, operands: list[tuple[torch.Tensor, ...]]):
        built = library()  # first: a failed build leaves nothing half made
        self.kernel = built.vsgd_step_float if operands[0][0].dtype == torch.float32 else built.vsgd_step_double
        pointers = [t.data_ptr() for tensors in operands for t in tensors]
        self.count = len(operands)
        self.pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.numels = (ctypes.c_int64 * len(operands))(*(tensors[0].numel() for tensors in operands))

    def launch(self, scalars: tuple[float, ...], first: bool) -> None:
        """`scalars`: `_StepScalars.fused_values` (13 floats); threads: torch's."""
        self.kernel(self.count, self.pointers, self.numels, (ctypes.c_double * 13)(*scalars), first,
                    torch.get_num_threads())
