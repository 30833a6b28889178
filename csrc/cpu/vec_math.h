// Row kernels of the CPU attention forward and backward (the forward's softmax is in
// microkernel.cpp) and of the FFN's bias + GELU, written as plain loops that GCC vectorizes,
// built for AVX-512, AVX2 and baseline x86-64 through target_clones (the loader picks the best
// at run time, so the extension stays portable without -march flags). Reductions keep 16 lane accumulators: float sums are not reordered by
// the compiler otherwise.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPERCEIVER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADAPERCEIVER_CLONES
#endif

namespace adaperceiver {
namespace cpu {

// exp(x) for x <= 0 up to ~2 ulp (Cephes expf: 2^n * p(r), r = x - n ln2); x below -87 (-inf
// included) gives 0 and NaN gives NaN. The polynomial runs on a clamped copy so that the
// float-to-int conversion of n never sees NaN (undefined behaviour). Selects only (no fmax: a
// libm call that stops the loops around it from vectorizing).
inline float exp_neg(float x_in) {
  const float x = x_in >= -87.0f ? x_in : -87.0f;  // NaN compares false: clamped, n an int
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x_in != x_in ? x_in : (x_in < -87.0f ? 0.f : y * two_n);
}

// Backward row: p = exp(s - lse); ds = p * (dp - delta) * scale, in place in s and dp.
ADAPERCEIVER_CLONES
inline void row_softmax_grad(float* s, float* dp, int64_t n, float lse, float delta,
                             float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float p = exp_neg(s[i] - lse);
    s[i] = p;
    dp[i] = (dp[i] - delta) * p * scale;
  }
}

ADAPERCEIVER_CLONES
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float sum = 0.f;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// erf(x) by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7). The GELU below is within 5e-7
// absolute of the exact (float64) GELU and within 1.3e-6 absolute of at::gelu in float32 (which
// is less accurate in the far negative tail, where 1 + erf cancels in both).
inline float erf_as(float x) {
  const float a = std::fabs(x);
  const float t = 1.f / (1.f + 0.3275911f * a);
  const float r =
      (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
      0.254829592f;
  return std::copysign(1.f - r * t * exp_neg(-a * a), x);
}

// FFN row: x = GELU(x + b) in place (exact, erf form): fc1's bias and activation in one pass
// over the GEMM output instead of a bias copy before the GEMM and a GELU pass after it.
// GELU(+inf) is NaN, as torch's float32 / bfloat16 / float16 GELU (the reference) and
// oneDNN's (the bfloat16 path) give it; GELU(-inf) = -inf * 0 is NaN anyway.
ADAPERCEIVER_CLONES
inline void bias_gelu_row(float* x, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] + b[i];
    const float g = 0.5f * v * (1.f + erf_as(v * 0.7071067811865476f));
    x[i] = v > std::numeric_limits<float>::max() ? std::numeric_limits<float>::quiet_NaN() : g;
  }
}

// Attention forward row: dst = x * s (an output row divided by its softmax sum).
ADAPERCEIVER_CLONES
inline void scale_row(float* dst, const float* x, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = x[i] * s;
}

// RoPE of one row of interleaved pairs into a contiguous dst, times mul:
// (x[2i], x[2i+1]) -> mul * (x[2i] c[i] - x[2i+1] s[i], x[2i] s[i] + x[2i+1] c[i]).
ADAPERCEIVER_CLONES
inline void rope_row_contiguous(const float* x, const float* c, const float* s, int64_t half,
                                float mul, float* dst) {
  for (int64_t i = 0; i < half; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1];
    dst[2 * i] = mul * (x0 * c[i] - x1 * s[i]);
    dst[2 * i + 1] = mul * (x0 * s[i] + x1 * c[i]);
  }
}

// n bfloat16 values (their bits) as float32: the high half of a float's bits.
ADAPERCEIVER_CLONES
inline void bf16_to_float_row(const uint16_t* x, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(x[i]) << 16);
}

// n float16 values (their bits) as float32, exactly: F16C's vcvtph2ps, 8 a step, where the CPU
// has it (every CPU with AVX2 does), else c10's conversion value by value. Why: c10::Half's
// conversion is scalar bit manipulation that GCC does not vectorize, and the float32 attention
// converts every float16 row it reads. NaN stays NaN (a signalling NaN comes back quiet),
// infinities and subnormals are exact.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) inline void half_to_float_row_f16c(const uint16_t* x,
                                                                       int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(c10::Half(x[i], c10::Half::from_bits()));
}
#endif

inline void half_to_float_row(const uint16_t* x, int64_t n, float* dst) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (f16c) return half_to_float_row_f16c(x, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(c10::Half(x[i], c10::Half::from_bits()));
  }
}

// x (n values of T: float, c10::BFloat16 or c10::Half) as float32 into dst.
template <typename T>
inline void to_float_row(const T* x, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(x, x + n, dst);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16_to_float_row(reinterpret_cast<const uint16_t*>(x), n, dst);
  } else {
    half_to_float_row(reinterpret_cast<const uint16_t*>(x), n, dst);
  }
}

// x as float32 (n values): x itself when T is float, else converted into buf.
template <typename T>
inline const float* float_row(const T* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    to_float_row(x, n, buf);
    return buf;
  }
}

}  // namespace cpu
}  // namespace adaperceiver
