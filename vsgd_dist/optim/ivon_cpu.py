"""Fused IVON on CPU: one call of a small C++ kernel draws a whole list's sample, one call
steps it.

The sample draws z with the counter-based generator of `noise` (the same bits as its torch
reference: integer Philox, float32 polynomials, every operation rounded on its own under
-ffp-contract=off) one Philox per four elements, 16 counters side by side, and writes mean <- param (at the step's first
sample), eps <- z * sigma, param <- mean + eps in the same pass (the arithmetic of `ivon._sample_eager`, so the sample is
bitwise the eager path's). The step is the update of `ivon._single_tensor_update` in one pass
(reads mean, grad, stat, m, h; writes param, m, h). `cpp_kernel` builds it once per machine
into its cache directory. Work is cut into 64K-element items that threads take as they finish.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from vsgd_dist.optim import cpp_kernel
from vsgd_dist.optim.noise import CONSTANTS

_CONSTANTS = "\n".join(f"constexpr float k_{name} = {value.hex()}f;" for name, value in CONSTANTS.items())

SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t kPiece = 1 << 16;  // elements per work item shared among threads
constexpr int64_t kBlock = 256;  // elements drawn at a time (their z stay in L1)
constexpr int64_t kChunk = 64;  // elements of 16 Philox counters (noise.py)
constexpr int64_t kGroups = (kBlock / kChunk + 1) * 16;  // counters a block can touch
""" + _CONSTANTS + r"""

struct Counter {
  uint32_t k0, k1, step, sample;
};

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

inline float log_unit(float u) {  // log(u), u in (0, 1]: noise._log
  const uint32_t bits = float_to_bits(u);
  int32_t exponent = int32_t(bits >> 23) - 126;
  const float mantissa = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);
  const bool small = mantissa < k_sqrt_half;
  exponent -= small ? 1 : 0;
  float x = (small ? mantissa + mantissa : mantissa) - 1.0f;
  const float z = x * x;
  float y = x * k_log0 + k_log1;
  y = y * x + k_log2;
  y = y * x + k_log3;
  y = y * x + k_log4;
  y = y * x + k_log5;
  y = y * x + k_log6;
  y = y * x + k_log7;
  y = y * x + k_log8;
  y = y * x;
  y = y * z;
  const float e = float(exponent);
  y = y + e * k_ln2_lo;
  y = y + z * -0.5f;
  x = x + y;
  return x + e * k_ln2_hi;
}

// Box-Muller of the words (a, b): z_even = r cos(angle), z_odd = r sin(angle), as noise.py.
inline void box_muller(uint32_t a, uint32_t b, float& even, float& odd) {
  const float u1 = float((a >> 8) + 1) * k_two_m24;
  const float radius = std::sqrt(log_unit(u1) * -2.0f);
  const float fraction = float((b >> 6) & 0xFFFFFFu) * k_two_m24;
  const bool upper = fraction >= 0.5f;
  const float x = (upper ? 1.0f - fraction : fraction) * k_half_pi;
  const float z = x * x;
  float s = z * k_sin0 + k_sin1;
  s = s * z + k_sin2;
  s = s * z;
  s = s * x;
  s = s + x;
  float c = z * k_cos0 + k_cos1;
  c = c * z + k_cos2;
  c = c * z;
  c = c * z;
  c = c - z * 0.5f;
  c = c + 1.0f;
  const float sin_f = upper ? c : s, cos_f = upper ? s : c;
  const uint32_t quadrant = b >> 30;
  const float cos_v = (quadrant & 1) ? sin_f : cos_f, sin_v = (quadrant & 1) ? cos_f : sin_f;
  even = radius * ((quadrant == 1 || quadrant == 2) ? -cos_v : cos_v);
  odd = radius * (quadrant >= 2 ? -sin_v : sin_v);
}

#if defined(__AVX512F__)
// box_muller on 16 lanes: the same operations in the same order (bitwise the scalar one).
inline void box_muller16(__m512i a, __m512i b, float* even_out, float* odd_out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 u1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_srli_epi32(a, 8), _mm512_set1_epi32(1))),
                                  _mm512_set1_ps(k_two_m24));
  // log_unit(u1)
  const __m512i bits = _mm512_castps_si512(u1);
  __m512i exponent = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126));
  const __m512 mantissa = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)),
                                                             _mm512_set1_epi32(0x3F000000)));
  const __mmask16 small = _mm512_cmp_ps_mask(mantissa, _mm512_set1_ps(k_sqrt_half), _CMP_LT_OQ);
  exponent = _mm512_mask_sub_epi32(exponent, small, exponent, _mm512_set1_epi32(1));
  __m512 x = _mm512_sub_ps(_mm512_mask_add_ps(mantissa, small, mantissa, mantissa), one);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(k_log0)), _mm512_set1_ps(k_log1));
  y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(k_log2));
  y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(k_log3));
  y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(k_log4));
  y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(k_log5));
  y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(k_log6));
  y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(k_log7));
  y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(k_log8));
  y = _mm512_mul_ps(y, x);
  y = _mm512_mul_ps(y, z);
  const __m512 e = _mm512_cvtepi32_ps(exponent);
  y = _mm512_add_ps(y, _mm512_mul_ps(e, _mm512_set1_ps(k_ln2_lo)));
  y = _mm512_add_ps(y, _mm512_mul_ps(z, _mm512_set1_ps(-0.5f)));
  x = _mm512_add_ps(x, y);
  const __m512 log_u = _mm512_add_ps(x, _mm512_mul_ps(e, _mm512_set1_ps(k_ln2_hi)));
  const __m512 radius = _mm512_sqrt_ps(_mm512_mul_ps(log_u, _mm512_set1_ps(-2.0f)));
  // angle
  const __m512 fraction = _mm512_mul_ps(
      _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(b, 6), _mm512_set1_epi32(0xFFFFFF))), _mm512_set1_ps(k_two_m24));
  const __mmask16 upper = _mm512_cmp_ps_mask(fraction, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  const __m512 xa = _mm512_mul_ps(_mm512_mask_sub_ps(fraction, upper, one, fraction), _mm512_set1_ps(k_half_pi));
  const __m512 za = _mm512_mul_ps(xa, xa);
  __m512 s = _mm512_add_ps(_mm512_mul_ps(za, _mm512_set1_ps(k_sin0)), _mm512_set1_ps(k_sin1));
  s = _mm512_add_ps(_mm512_mul_ps(s, za), _mm512_set1_ps(k_sin2));
  s = _mm512_mul_ps(s, za);
  s = _mm512_mul_ps(s, xa);
  s = _mm512_add_ps(s, xa);
  __m512 c = _mm512_add_ps(_mm512_mul_ps(za, _mm512_set1_ps(k_cos0)), _mm512_set1_ps(k_cos1));
  c = _mm512_add_ps(_mm512_mul_ps(c, za), _mm512_set1_ps(k_cos2));
  c = _mm512_mul_ps(c, za);
  c = _mm512_mul_ps(c, za);
  c = _mm512_sub_ps(c, _mm512_mul_ps(za, _mm512_set1_ps(0.5f)));
  c = _mm512_add_ps(c, one);
  const __m512 sin_f = _mm512_mask_blend_ps(upper, s, c), cos_f = _mm512_mask_blend_ps(upper, c, s);
  const __m512i quadrant = _mm512_srli_epi32(b, 30);
  const __mmask16 odd_q = _mm512_test_epi32_mask(quadrant, _mm512_set1_epi32(1));
  const __m512 cos_v = _mm512_mask_blend_ps(odd_q, cos_f, sin_f), sin_v = _mm512_mask_blend_ps(odd_q, sin_f, cos_f);
  const __mmask16 neg_cos = _mm512_cmpeq_epi32_mask(quadrant, _mm512_set1_epi32(1)) |
                            _mm512_cmpeq_epi32_mask(quadrant, _mm512_set1_epi32(2));
  const __mmask16 neg_sin = _mm512_cmpge_epu32_mask(quadrant, _mm512_set1_epi32(2));
  const __m512 sign = _mm512_set1_ps(-0.0f);
  _mm512_store_ps(even_out, _mm512_mul_ps(radius, _mm512_mask_xor_ps(cos_v, neg_cos, cos_v, sign)));
  _mm512_store_ps(odd_out, _mm512_mul_ps(radius, _mm512_mask_xor_ps(sin_v, neg_sin, sin_v, sign)));
}
#endif

// Philox4x32-10 of the counters (first_group + j, step, sample), j < groups (a multiple of 16),
// word q into w[q][j].
void philox(const Counter& counter, uint64_t first_group, int64_t groups, uint32_t (*w)[kGroups]) {
#if defined(__AVX512F__)
  // 16 counters per vector, U vectors at a time: one vector's rounds are a chain of dependent
  // multiplies, so independent vectors side by side fill the multiplier's pipeline. AVX-512 has
  // no 32-bit high multiply: even and odd lanes go through two 32x32->64 multiplies (GCC's own
  // vectorization of the scalar loop below was 4x slower).
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr int U = 4;
  int64_t j = 0;
  auto rounds = [&](auto width) {
    constexpr int V = decltype(width)::value;
    __m512i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      const uint64_t g = first_group + uint64_t(j + 16 * v);  // g % 16 == 0: the low word does not carry
      c0[v] = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(g))), lanes);
      c1[v] = _mm512_set1_epi32(int(uint32_t(g >> 32)));
      c2[v] = _mm512_set1_epi32(int(counter.step));
      c3[v] = _mm512_set1_epi32(int(counter.sample));
    }
    uint32_t k0 = counter.k0, k1 = counter.k1;
    for (int r = 0; r < 10; ++r) {
      if (r) {
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      const __m512i key0 = _mm512_set1_epi32(int(k0)), key1 = _mm512_set1_epi32(int(k1));
      for (int v = 0; v < V; ++v) {
        const __m512i e0 = _mm512_mul_epu32(c0[v], m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0[v], 32), m0);
        const __m512i e1 = _mm512_mul_epu32(c2[v], m1), o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2[v], 32), m1);
        const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e0, 32), o0);
        const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, e0, _mm512_slli_epi64(o0, 32));
        const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e1, 32), o1);
        const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, e1, _mm512_slli_epi64(o1, 32));
        c0[v] = _mm512_ternarylogic_epi32(hi1, c1[v], key0, 0x96);  // a ^ b ^ c
        c2[v] = _mm512_ternarylogic_epi32(hi0, c3[v], key1, 0x96);
        c1[v] = lo1;
        c3[v] = lo0;
      }
    }
    for (int v = 0; v < V; ++v) {
      _mm512_store_si512(reinterpret_cast<__m512i*>(w[0] + j + 16 * v), c0[v]);
      _mm512_store_si512(reinterpret_cast<__m512i*>(w[1] + j + 16 * v), c1[v]);
      _mm512_store_si512(reinterpret_cast<__m512i*>(w[2] + j + 16 * v), c2[v]);
      _mm512_store_si512(reinterpret_cast<__m512i*>(w[3] + j + 16 * v), c3[v]);
    }
    j += 16 * V;
  };
  while (j + 16 * U <= groups) rounds(std::integral_constant<int, U>{});
  while (j < groups) rounds(std::integral_constant<int, 1>{});
#else
  for (int64_t j = 0; j < groups; ++j) {
    const uint64_t g = first_group + uint64_t(j);
    uint32_t c0 = uint32_t(g), c1 = uint32_t(g >> 32), c2 = counter.step, c3 = counter.sample;
    uint32_t k0 = counter.k0, k1 = counter.k1;
    for (int r = 0; r < 10; ++r) {
      if (r) {
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
      c1 = uint32_t(p1);
      c3 = uint32_t(p0);
      c0 = n0;
      c2 = n2;
    }
    w[0][j] = c0;
    w[1][j] = c1;
    w[2][j] = c2;
    w[3][j] = c3;
  }
#endif
}

// z of global elements [first, first + n), n <= kBlock: the chunks of 64 that hold them.
void normals(const Counter& counter, int64_t first, int64_t n, float* out) {
  const uint64_t c_first = uint64_t(first) / kChunk;
  const int64_t chunks = int64_t(uint64_t(first + n - 1) / kChunk - c_first + 1);
  const int64_t groups = chunks * 16;
  alignas(64) uint32_t w[4][kGroups];
  philox(counter, c_first << 4, groups, w);
  alignas(64) float z[kGroups * 4];  // chunk k's word q of lane l at k * 64 + q * 16 + l
  for (int64_t k = 0; k < chunks; ++k) {
#if defined(__AVX512F__)
    const auto word = [&](int q) { return _mm512_load_si512(reinterpret_cast<const __m512i*>(w[q] + k * 16)); };
    box_muller16(word(0), word(1), z + k * 64, z + k * 64 + 16);
    box_muller16(word(2), word(3), z + k * 64 + 32, z + k * 64 + 48);
#else
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t j = k * 16 + l;
      box_muller(w[0][j], w[1][j], z[k * 64 + l], z[k * 64 + 16 + l]);
      box_muller(w[2][j], w[3][j], z[k * 64 + 32 + l], z[k * 64 + 48 + l]);
    }
#endif
  }
  std::memcpy(out, z + (first - int64_t(c_first) * kChunk), n * sizeof(float));
}

// Copies n elements to dst with non-temporal stores where the CPU has them: dst is written, not
// read, and a plain store would first read each line from memory (28 instead of 20 bytes per
// sampled fp32 element). Values are unchanged; callers end a work item with a store fence.
template <typename T>
void stream_copy(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  int64_t bytes = n * int64_t(sizeof(T));
#if defined(__AVX512F__) || defined(__AVX__)
#if defined(__AVX512F__)
  constexpr int64_t kVec = 64;
#else
  constexpr int64_t kVec = 32;
#endif
  const int64_t head = std::min(bytes, int64_t((kVec - (reinterpret_cast<uintptr_t>(d) % kVec)) % kVec));
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= kVec; bytes -= kVec, d += kVec, s += kVec) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#endif
  }
#endif
  std::memcpy(d, s, bytes);
}

inline void store_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

template <typename T, bool First>
void sample_range(T* __restrict__ param, const T* __restrict__ h, T* __restrict__ mean, T* __restrict__ eps,
                  int64_t n, int64_t first, const Counter& counter, T ess, T wd) {
  alignas(64) float z[kBlock];
  alignas(64) T e_block[kBlock];
  // Blocks end on chunk boundaries of the global index, so that each draws only its chunks.
  for (int64_t lo = 0, len = 0; lo < n; lo += len) {
    len = std::min(kBlock - (first + lo) % kChunk, n - lo);
    normals(counter, first + lo, len, z);
    if (First) stream_copy(mean + lo, param + lo, len);
    const T* m_src = First ? param : mean;
    for (int64_t i = 0; i < len; ++i) {
      const T sigma = T(1) / std::sqrt((h[lo + i] + wd) * ess);
      const T e = T(z[i]) * sigma;
      e_block[i] = e;
      param[lo + i] = m_src[lo + i] + e;
    }
    stream_copy(eps + lo, e_block, len);
  }
  store_fence();
}

// s: lr, ess, wd, beta1, 1 - beta1, beta2, 1 - beta2, c, bias, clip, n
template <typename T, bool Single, bool Price, bool Averaged>
void step_range(T* __restrict__ param, const T* __restrict__ mean, const T* __restrict__ grad,
                const T* __restrict__ stat, T* __restrict__ m, T* __restrict__ h, int64_t n, const T* s) {
  const T lr = s[0], ess = s[1], wd = s[2], beta1 = s[3], keep1 = s[4], beta2 = s[5], keep2 = s[6], c = s[7],
          bias = s[8], clip = s[9], count = s[10];
  alignas(64) T w_block[kBlock];
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t len = std::min(kBlock, n - lo);
    for (int64_t i = lo; i < lo + len; ++i) {
      T g = grad[i];
      T st = Single ? g * stat[i] : stat[i];
      if (Averaged) {
        g = g / count;
        st = st / count;
      }
      const T hi = h[i];
      const T hd = hi + wd;
      const T hhat = Price ? (hd * ess) * st : st * ess;
      T corr = hi - hhat;
      corr = corr * corr;
      corr = corr / hd;
      corr = corr * c;
      const T mi = m[i] * beta1 + g * keep1;
      const T hn = hi * beta2 + hhat * keep2 + corr;
      const T w = mean[i];
      T step = mi / bias;
      step = step + w * wd;
      step = step / (hn + wd);
      step = std::min(std::max(step, -clip), clip);
      m[i] = mi;
      h[i] = hn;
      w_block[i - lo] = w - step * lr;
    }
    stream_copy(param + lo, w_block, len);  // param is written here, not read
  }
  store_fence();
}

template <typename F>
void for_items(int64_t count, const int64_t* numels, int threads, F&& body) {
  std::vector<int64_t> starts(count + 1, 0);  // first work item of each range
  for (int64_t t = 0; t < count; ++t) starts[t + 1] = starts[t] + (numels[t] + kPiece - 1) / kPiece;
  const int64_t items = starts[count];
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t t = std::upper_bound(starts.begin(), starts.end(), item) - starts.begin() - 1;
    const int64_t lo = (item - starts[t]) * kPiece;
    body(t, lo, std::min(kPiece, numels[t] - lo));
  }
}

template <typename T>
void sample(int64_t count, void* const* tensors, const int64_t* numels, const int64_t* firsts, uint64_t seed,
            uint32_t step, uint32_t mc_sample, const double* scalars, bool keep_mean, int threads) {
  const Counter counter{uint32_t(seed), uint32_t(seed >> 32), step, mc_sample};
  const T ess = T(scalars[0]), wd = T(scalars[1]);
  for_items(count, numels, threads, [&](int64_t t, int64_t lo, int64_t n) {
    T* const* p = reinterpret_cast<T* const*>(tensors + 4 * t);
    (keep_mean ? sample_range<T, true> : sample_range<T, false>)(p[0] + lo, p[1] + lo, p[2] + lo, p[3] + lo, n,
                                                                  firsts[t] + lo, counter, ess, wd);
  });
}

template <typename T, bool Single, bool Price, bool Averaged>
void step_all(int64_t count, void* const* tensors, const int64_t* numels, const T* s, int threads) {
  for_items(count, numels, threads, [&](int64_t t, int64_t lo, int64_t n) {
    T* const* p = reinterpret_cast<T* const*>(tensors + 6 * t);
    step_range<T, Single, Price, Averaged>(p[0] + lo, p[1] + lo, p[2] + lo, p[3] + lo, p[4] + lo, p[5] + lo, n, s);
  });
}

template <typename T>
void step(int64_t count, void* const* tensors, const int64_t* numels, const double* scalars, bool single,
          bool price, int threads) {
  T s[11];
  for (int k = 0; k < 11; ++k) s[k] = static_cast<T>(scalars[k]);
  const bool averaged = scalars[10] != 1.0;
  const int variant = (single ? 4 : 0) | (price ? 2 : 0) | (averaged ? 1 : 0);
  switch (variant) {
    case 0: step_all<T, false, false, false>(count, tensors, numels, s, threads); break;
    case 1: step_all<T, false, false, true>(count, tensors, numels, s, threads); break;
    case 2: step_all<T, false, true, false>(count, tensors, numels, s, threads); break;
    case 3: step_all<T, false, true, true>(count, tensors, numels, s, threads); break;
    case 4: step_all<T, true, false, false>(count, tensors, numels, s, threads); break;
    case 5: step_all<T, true, false, true>(count, tensors, numels, s, threads); break;
    case 6: step_all<T, true, true, false>(count, tensors, numels, s, threads); break;
    default: step_all<T, true, true, true>(count, tensors, numels, s, threads); break;
  }
}
}  // namespace

extern "C" void ivon_normals(uint64_t seed, uint32_t step, uint32_t mc_sample, int64_t first, int64_t n, float* out) {
  const Counter counter{uint32_t(seed), uint32_t(seed >> 32), step, mc_sample};
  for (int64_t lo = 0; lo < n; lo += kBlock) normals(counter, first + lo, std::min(kBlock, n - lo), out + lo);
}

extern "C" void ivon_sample_float(int64_t count, void* const* tensors, const int64_t* numels, const int64_t* firsts,
                                  uint64_t seed, uint32_t step, uint32_t mc_sample, const double* scalars,
                                  bool keep_mean, int threads) {
  sample<float>(count, tensors, numels, firsts, seed, step, mc_sample, scalars, keep_mean, threads);
}

extern "C" void ivon_sample_double(int64_t count, void* const* tensors, const int64_t* numels,
                                   const int64_t* firsts, uint64_t seed, uint32_t step, uint32_t mc_sample,
                                   const double* scalars, bool keep_mean, int threads) {
  sample<double>(count, tensors, numels, firsts, seed, step, mc_sample, scalars, keep_mean, threads);
}

extern "C" void ivon_step_float(int64_t count, void* const* tensors, const int64_t* numels, const double* scalars,
                                bool single, bool price, int threads) {
  step<float>(count, tensors, numels, scalars, single, price, threads);
}

extern "C" void ivon_step_double(int64_t count, void* const* tensors, const int64_t* numels,
                                 const double* scalars, bool single, bool price, int threads) {
  step<double>(count, tensors, numels, scalars, single, price, threads);
}
"""

SUPPORTED = frozenset({torch.float32, torch.float64})
"""Parameter dtypes the kernel reads and writes (the state of the parameter's dtype)."""


@functools.cache
def library() -> ctypes.CDLL:
    built = cpp_kernel.load("ivon", SOURCE)
    c_ptr, c_i64 = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)
    built.ivon_normals.argtypes = [ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_void_p]
    for fn in (built.ivon_sample_float, built.ivon_sample_double):
        fn.argtypes = [ctypes.c_int64, c_ptr, c_i64, c_i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.POINTER(ctypes.c_double), ctypes.c_bool, ctypes.c_int]
    for fn in (built.ivon_step_float, built.ivon_step_double):
        fn.argtypes = [ctypes.c_int64, c_ptr, c_i64, ctypes.POINTER(ctypes.c_double), ctypes.c_bool,
                       ctypes.c_bool, ctypes.c_int]
    for fn in (built.ivon_normals, built.ivon_sample_float, built.ivon_sample_double, built.ivon_step_float,
               built.ivon_step_double):
        fn.restype = None
    return built


def normals(seed: int, step: int, sample: int, start: int, numel: int) -> torch.Tensor:
    """The kernel's z for global elements [start, start + numel) (float32): what
    `noise.standard_normal` returns, computed by the C++ code."""
    out = torch.empty(numel, dtype=torch.float32)
    library().ivon_normals(seed, step, sample, start, numel, out.data_ptr())
    return out


class CpuSampleTable:
    """The sample kernel's arguments for one list of ranges: (param, h, mean, eps) 1-D views
    of one dtype (fp32 or fp64) and the global index of each range's first element."""

    def __init__(self, ranges: list[tuple[torch.Tensor, ...]], firsts: list[int]):
        built = library()
        self.kernel = built.ivon_sample_float if ranges[0][0].dtype == torch.float32 else built.ivon_sample_double
        pointers = [t.data_ptr() for tensors in ranges for t in tensors]
        self.count = len(ranges)
        self.pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.numels = (ctypes.c_int64 * len(ranges))(*(tensors[0].numel() for tensors in ranges))
        self.firsts = (ctypes.c_int64 * len(ranges))(*firsts)

    def launch(self, seed: int, step: int, sample: int, ess: float, wd: float, keep_mean: bool) -> None:
        """keep_mean: the step's first sample (mean <- param); else param <- mean + eps."""
        self.kernel(self.count, self.pointers, self.numels, self.firsts, seed, step, sample,
                    (ctypes.c_double * 2)(ess, wd), keep_mean, torch.get_num_threads())


class CpuStepTable:
    """The step kernel's arguments for one list: (param, mean, grad, stat, m, h) 1-D views of
    one dtype (fp32 or fp64)."""

    def __init__(self, operands: list[tuple[torch.Tensor, ...]]):
        built = library()
        self.kernel = built.ivon_step_float if operands[0][0].dtype == torch.float32 else built.ivon_step_double
        pointers = [t.data_ptr() for tensors in operands for t in tensors]
        self.count = len(operands)
        self.pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.numels = (ctypes.c_int64 * len(operands))(*(tensors[0].numel() for tensors in operands))

    def launch(self, scalars: tuple[float, ...], single: bool, price: bool) -> None:
        """`scalars`: lr, ess, wd, beta1, 1 - beta1, beta2, 1 - beta2, c, bias, clip, n."""
        self.kernel(self.count, self.pointers, self.numels, (ctypes.c_double * 11)(*scalars), single, price,
                    torch.get_num_threads())
