// See microkernel.h. The AVX-512 and AVX2 bodies are compiled with function-level target
// attributes and chosen at run time (__builtin_cpu_supports), so the library needs no -march flag.
#include "cpu/microkernel.h"
#include "cpu/avx512_math.h"
#include "common.h"

#include <ATen/cpu/Utils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

// The Fortran BLAS sgemm (MKL here) exported by libtorch_cpu. at::native::cpublas::gemm would
// be the portable spelling but its float overload is not exported from libtorch_cpu.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace adaperceiver {
namespace cpu {

void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
             int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // row-major C is column-major C^T = op(B)^T op(A)^T
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  sgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
constexpr int MR = 8, NR = 32;

// The register tiles (AVX-512 8 x 32 here, AVX2 + FMA 6 x 16 below) unrolled over their rows:
// ADAPERCEIVER_TILE_ROWS_<n>(X, args) is X(r, args) for r = 0 .. n-1. Row r reads A through a<r>
// and accumulates into two named registers c<r>0, c<r>1 (an array of them made GCC spill every
// k step). Rows past R (the m tail) recompute row R - 1 and are not stored.
#define ADAPERCEIVER_TILE_ROWS_6(X, ...) \
  X(0, __VA_ARGS__) X(1, __VA_ARGS__) X(2, __VA_ARGS__) X(3, __VA_ARGS__) X(4, __VA_ARGS__) \
  X(5, __VA_ARGS__)
#define ADAPERCEIVER_TILE_ROWS_8(X, ...) \
  ADAPERCEIVER_TILE_ROWS_6(X, __VA_ARGS__) X(6, __VA_ARGS__) X(7, __VA_ARGS__)
// row r's A pointer and its accumulators (type vec), zeroed
#define ADAPERCEIVER_TILE_START(r, vec, zero)    \
  const float* a##r = a + (R > r ? r : R - 1) * rs; \
  vec c##r##0 = zero(), c##r##1 = c##r##0;
// row r's k step (A's column offset o, B's vectors b0, b1): broadcast, two FMAs
#define ADAPERCEIVER_TILE_FMA(r, set1, fmadd) \
  {                                           \
    const auto av = set1(a##r[o]);            \
    c##r##0 = fmadd(av, b0, c##r##0);         \
    c##r##1 = fmadd(av, b1, c##r##1);         \
  }

// One 8 x 32 tile of C (16 of the 32 zmm registers accumulate).
__attribute__((target("avx512f"))) void tile(int R, int64_t k, const float* a, int64_t rs,
                                             int64_t cs, const float* b, int64_t ldb, float* c,
                                             int64_t ldc, __mmask16 m0, __mmask16 m1,
                                             bool accumulate) {
  ADAPERCEIVER_TILE_ROWS_8(ADAPERCEIVER_TILE_START, __m512, _mm512_setzero_ps)
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + p * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + p * ldb + 16);
    const int64_t o = p * cs;
    ADAPERCEIVER_TILE_ROWS_8(ADAPERCEIVER_TILE_FMA, _mm512_set1_ps, _mm512_fmadd_ps)
  }
#define ADAPERCEIVER_PUT(r, ...)                                               \
  if ((r) < R) {                                                               \
    float* cr = c + (r) * ldc;                                                 \
    if (accumulate) {                                                          \
      c##r##0 = _mm512_add_ps(c##r##0, _mm512_maskz_loadu_ps(m0, cr));         \
      c##r##1 = _mm512_add_ps(c##r##1, _mm512_maskz_loadu_ps(m1, cr + 16));    \
    }                                                                          \
    _mm512_mask_storeu_ps(cr, m0, c##r##0);                                    \
    _mm512_mask_storeu_ps(cr + 16, m1, c##r##1);                               \
  }
  ADAPERCEIVER_TILE_ROWS_8(ADAPERCEIVER_PUT, )
#undef ADAPERCEIVER_PUT
}

__attribute__((target("avx512f"))) void small_gemm_avx512(int64_t m, int64_t n, int64_t k,
                                                          const float* a, int64_t rs,
                                                          int64_t cs, const float* b,
                                                          int64_t ldb, float* c, int64_t ldc,
                                                          bool accumulate) {
  for (int64_t j0 = 0; j0 < n; j0 += NR) {
    const int64_t w = n - j0 < NR ? n - j0 : NR;
    const __mmask16 m0 = lanes_below(w, 0), m1 = lanes_below(w, 16);
    // the B panel (k x 32) stays in cache while the row tiles stream A
    for (int64_t i0 = 0; i0 < m; i0 += MR) {
      const float* ai = a + i0 * rs;
      float* ci = c + i0 * ldc + j0;
      tile(static_cast<int>(m - i0 < MR ? m - i0 : MR), k, ai, rs, cs, b + j0, ldb, ci, ldc, m0, m1,
           accumulate);
    }
  }
}

// exp(x) for x <= 0 (Cephes expf polynomial on r = x - n ln2, times 2^n by scalef); ~2 ulp.
// NaN stays NaN (max_ps returns its second operand when either is NaN); x below -120, -inf
// included, gives exactly 0 (2^n underflows in scalef), so a masked score weighs nothing.
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-120.0f), x);
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                                 _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

__attribute__((target("avx512f"))) void col_softmax_avx512(float* st, int64_t kc, int64_t ld,
                                                           int64_t cols, const float* m_old,
                                                           float* m_new, float* sum) {
  const __mmask16 k0 = lanes_below(cols, 0), k1 = lanes_below(cols, 16);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 mx0 = _mm512_mask_loadu_ps(ninf, k0, m_old);
  __m512 mx1 = _mm512_mask_loadu_ps(ninf, k1, m_old + 16);
  for (int64_t j = 0; j < kc; ++j) {
    const __m512 v0 = _mm512_mask_loadu_ps(ninf, k0, st + j * ld);
    const __m512 v1 = _mm512_mask_loadu_ps(ninf, k1, st + j * ld + 16);
    // NaN-sticky max: max_ps(v, mx) keeps a NaN mx; a NaN v is put in by the mask move
    mx0 = _mm512_mask_mov_ps(_mm512_max_ps(v0, mx0), _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q), v0);
    mx1 = _mm512_mask_mov_ps(_mm512_max_ps(v1, mx1), _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q), v1);
  }
  // a column whose scores so far are all -inf subtracts 0 (its entries exp to 0, as masked
  // ones) instead of -inf (-inf - -inf = NaN): a later chunk may still give it a finite max
  const __m512 zero = _mm512_setzero_ps();
  const __m512 sub0 = _mm512_mask_mov_ps(mx0, _mm512_cmp_ps_mask(mx0, ninf, _CMP_EQ_OQ), zero);
  const __m512 sub1 = _mm512_mask_mov_ps(mx1, _mm512_cmp_ps_mask(mx1, ninf, _CMP_EQ_OQ), zero);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (int64_t j = 0; j < kc; ++j) {
    float* row = st + j * ld;
    const __m512 e0 = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k0, row), sub0));
    const __m512 e1 = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k1, row + 16), sub1));
    _mm512_mask_storeu_ps(row, k0, e0);
    _mm512_mask_storeu_ps(row + 16, k1, e1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  _mm512_mask_storeu_ps(m_new, k0, mx0);
  _mm512_mask_storeu_ps(m_new + 16, k1, mx1);
  _mm512_mask_storeu_ps(sum, k0, s0);
  _mm512_mask_storeu_ps(sum + 16, k1, s1);
}

// 2^t for t <= 0 (t = -inf gives 0, NaN stays NaN): 2^round(t) times a degree-4 minimax
// polynomial of the fraction in [-1/2, 1/2] (relative error 2.7e-6, ample for weights rounded
// to bfloat16 / float16 next). t is clamped at -150 first (max_ps returns its second operand,
// t, when t is NaN), where 2^t is below the smallest float and scalef gives 0.
__attribute__((target("avx512f"))) inline __m512 exp2_lowp(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-150.0f), t);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.57007147371769e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.591777339577675e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40247443318367e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931218504905701e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999992847442627e-1f));
  return _mm512_scalef_ps(p, n);
}

// 16 float32 weights, zero where k is clear, rounded to the 16-bit type (bfloat16: vcvtneps2bf16,
// round to nearest even, NaN kept; float16: vcvtps2ph)
template <bool kBf16>
__attribute__((target("avx512f,avx512bf16"))) inline __m256i round_lowp(__mmask16 k, __m512 e) {
  if constexpr (kBf16) {
    return (__m256i)_mm512_maskz_cvtneps_pbh(k, e);
  } else {
    return _mm512_maskz_cvtps_ph(k, e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

// The max of scale * s[j] over the scores j < valid that are not NaN, scale finite and > 0:
// scale times the max of s (rounding is monotonic, so that is the max of the rounded
// products), four accumulators so the max chain does not bound the loop. A NaN score is left
// out here (max_ps returns its second operand when either is NaN) and caught by the caller from
// the sum it makes.
__attribute__((target("avx512f"))) inline float max_scaled_positive(const float* s,
                                                                      int64_t valid, float scale) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t j = 0;
  for (; j + 64 <= valid; j += 64) {
    m0 = _mm512_max_ps(_mm512_loadu_ps(s + j), m0);
    m1 = _mm512_max_ps(_mm512_loadu_ps(s + j + 16), m1);
    m2 = _mm512_max_ps(_mm512_loadu_ps(s + j + 32), m2);
    m3 = _mm512_max_ps(_mm512_loadu_ps(s + j + 48), m3);
  }
  for (; j < valid; j += 16) {
    m0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, lanes_below(valid, j), s + j), m0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3))) *
         scale;
}

// The same for any scale (negative, zero, infinite or NaN): scale * s[j] per score, NaN-sticky.
__attribute__((target("avx512f"))) inline float max_scaled_any(const float* s, int64_t valid,
                                                                 float scale) {
  const __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  __m512 mx = ninf;
  __mmask16 nan = 0;
  for (int64_t j = 0; j < valid; j += 16) {
    const __mmask16 k = lanes_below(valid, j);
    const __m512 v = _mm512_mask_mul_ps(ninf, k, _mm512_maskz_loadu_ps(k, s + j), vs);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(v, mx);  // a NaN v leaves mx (recorded in nan instead)
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
}

// 32 float32 weights (e0: the first 16, e1: the next 16) rounded to the 16-bit type, in order,
// as one vector; the rounding as round_lowp's (bfloat16: one vcvtne2ps2bf16 for both halves)
template <bool kBf16>
__attribute__((target("avx512f,avx512bf16"))) inline __m512i round_lowp32(__m512 e0, __m512 e1) {
  if constexpr (kBf16) {
    return (__m512i)_mm512_cvtne2ps_pbh(e1, e0);
  } else {
    constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(e0, kRne)),
                              _mm512_cvtps_ph(e1, kRne), 1);
  }
}

// sum plus the 32 rounded weights of h (bfloat16: a dot product of their pairs with ones,
// vdpbf16ps; float16: converted back and added)
template <bool kBf16>
__attribute__((target("avx512f,avx512bf16"))) inline __m512 add_rounded(__m512 sum, __m512i h) {
  if constexpr (kBf16) {
    return _mm512_dpbf16_ps(sum, (__m512bh)h, (__m512bh)_mm512_set1_epi16(0x3F80));  // 1.0
  } else {
    sum = _mm512_add_ps(sum, _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
    return _mm512_add_ps(sum, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)));
  }
}

// Pass 2 of softmax_row_avx512: p[j] = exp(scale * s[j] - m) rounded, for j < valid (0 up to
// width), returning the sum of the rounded weights. exp(scale * s - m) = 2^(s c - m log2 e)
// with c = scale log2 e, one fused multiply-add per 16 scores; m = -inf (every score so far
// -inf) subtracts 0, not -inf (see col_softmax_avx512). 32 scores a step, rounded into one
// vector and stored with one 64-byte store; whole steps below valid take no masks, the last
// steps mask the loads and zero the lanes past valid (they may hold any score); one sum per loop.
template <bool kBf16>
__attribute__((target("avx512f,avx512bf16,avx512bw"))) float softmax_weights(const float* s,
                                                                          int64_t valid,
                                                                          int64_t width,
                                                                          float scale, float m,
                                                                          uint16_t* p) {
  const float log2e = 1.44269504088896341f;
  const __m512 c = _mm512_set1_ps(scale * log2e);
  const __m512 sub = _mm512_set1_ps(m == -INFINITY ? 0.f : m * log2e);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= valid; j += 32) {
    const __m512 e0 = exp2_lowp(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), c, sub));
    const __m512 e1 = exp2_lowp(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), c, sub));
    const __m512i h = round_lowp32<kBf16>(e0, e1);
    sum0 = add_rounded<kBf16>(sum0, h);
    _mm512_storeu_si512(p + j, h);
  }
  for (; j < width; j += 32) {
    const __mmask16 k0 = lanes_below(valid, j), k1 = lanes_below(valid, j + 16);
    const __m512 e0 = _mm512_maskz_mov_ps(
        k0, exp2_lowp(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k0, s + j), c, sub)));
    const __m512 e1 = _mm512_maskz_mov_ps(
        k1, exp2_lowp(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k1, s + j + 16), c, sub)));
    const __m512i h = round_lowp32<kBf16>(e0, e1);
    sum1 = add_rounded<kBf16>(sum1, h);
    _mm512_mask_storeu_epi16(p + j, lanes32_below(width, j), h);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

// See softmax_row_lowp in microkernel.h. Pass 1: the max of scale * s over the valid scores
// (max_scaled_*); pass 2: the rounded weights and their sum (softmax_weights). With a positive
// finite scale pass 1 skips NaN scores; a NaN score makes a NaN weight and so a NaN sum, and
// then (rare) the row is redone with m = NaN, as the reference's max is NaN-sticky. (A +inf
// score gives a NaN sum too, from inf - inf, with no NaN score: that row stays as it is.)
// AVX512-BF16 for the bfloat16 rounding and AVX512-BW for the 16-bit masked store: every CPU
// with AMX tiles has both, and the AVX512-BF16 products are taken only where both are.
template <bool kBf16>
__attribute__((target("avx512f,avx512bf16,avx512bw"))) float softmax_row_avx512(
    const float* s, int64_t valid, int64_t width, float scale, float m_old, float* m_new,
    uint16_t* p) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  const bool positive = scale > 0.f && std::isfinite(scale);
  const float mc = positive ? max_scaled_positive(s, valid, scale) : max_scaled_any(s, valid, scale);
  float m = (std::isnan(mc) || std::isnan(m_old)) ? kNaN : std::max(mc, m_old);
  float sum = softmax_weights<kBf16>(s, valid, width, scale, m, p);
  if (positive && std::isnan(sum) && !std::isnan(m) &&
      std::any_of(s, s + valid, [](float x) { return std::isnan(x); })) {
    m = kNaN;
    sum = softmax_weights<kBf16>(s, valid, width, scale, m, p);
  }
  *m_new = m;
  return sum;
}

// See softmax_grad_row_lowp in microkernel.h: one pass, 16 scores a step; exp as in
// softmax_row_avx512 (2^(x log2 e)), the rounding as scale_row_lowp's.
template <bool kBf16>
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void softmax_grad_row_avx512(
    const float* s, const float* dp, int64_t valid, int64_t width, float scale, float lse,
    float delta, uint16_t* p, uint16_t* ds) {
  const float log2e = 1.44269504088896341f;
  const __m512 vs = _mm512_set1_ps(scale), vd = _mm512_set1_ps(delta);
  // exp(scale * s - lse) = 2^(s c - lse log2 e), c = scale log2 e: one fused multiply-add
  const __m512 c = _mm512_set1_ps(scale * log2e), vl = _mm512_set1_ps(lse * log2e);
  for (int64_t j = 0; j < width; j += 16) {
    // lanes past valid: 0 (not computed: they may hold any score or NaN)
    const __mmask16 k = lanes_below(valid, j);
    const __mmask16 kw = lanes_below(width, j);
    const __m512 e = exp2_lowp(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + j), c, vl));
    const __m512 g =
        _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), vd), e), vs);
    _mm256_mask_storeu_epi16(p + j, kw, round_lowp<kBf16>(k, e));
    _mm256_mask_storeu_epi16(ds + j, kw, round_lowp<kBf16>(k, g));
  }
}

__attribute__((target("avx512f"))) void pack_pairs_transposed_avx512(
    const uint16_t* const* rows, int64_t nrows, int64_t npairs, uint16_t* dst, int64_t ld) {
  for (int64_t i0 = 0; i0 < npairs; i0 += 16) {
    const int64_t w = std::min<int64_t>(16, npairs - i0);
    const __mmask16 k = lanes_below(w, 0);
    __m512i r[16];
    for (int j = 0; j < 16; ++j) {
      r[j] = j < nrows ? _mm512_maskz_loadu_epi32(k, rows[j] + 2 * i0) : _mm512_setzero_si512();
    }
    transpose16x16(r);
    const __mmask16 kr = lanes_below(nrows, 0);
    for (int64_t i = 0; i < w; ++i) {
      _mm512_mask_storeu_epi32(dst + ((i0 + i) * ld) * 2, kr, r[i]);
    }
  }
}

__attribute__((target("avx512f,avx512bw"))) void interleave_pair_avx512(const uint16_t* a,
                                                                       const uint16_t* b,
                                                                       int64_t n,
                                                                       uint16_t* dst) {
  // out[2d] = a[d], out[2d + 1] = b[d]: word indices into the pair (a, b) of 32-word vectors
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int d = 0; d < 16; ++d) {
    lo_idx[2 * d] = d, lo_idx[2 * d + 1] = 32 + d;
    hi_idx[2 * d] = 16 + d, hi_idx[2 * d + 1] = 48 + d;
  }
  const __m512i il = _mm512_load_si512(lo_idx), ih = _mm512_load_si512(hi_idx);
  for (int64_t d = 0; d < n; d += 32) {
    const int64_t w = std::min<int64_t>(32, n - d);
    const __mmask32 k = w >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << w) - 1);
    const __m512i va = _mm512_maskz_loadu_epi16(k, a + d);
    const __m512i vb = b ? _mm512_maskz_loadu_epi16(k, b + d) : _mm512_setzero_si512();
    const __m512i lo = _mm512_permutex2var_epi16(va, il, vb);
    const __m512i hi = _mm512_permutex2var_epi16(va, ih, vb);
    const __mmask32 k0 = w >= 16 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (2 * w)) - 1);
    const __mmask32 k1 = w >= 32 ? __mmask32(0xFFFFFFFFu)
                         : w > 16 ? __mmask32((1u << (2 * (w - 16))) - 1) : __mmask32(0);
    _mm512_mask_storeu_epi16(dst + 2 * d, k0, lo);
    _mm512_mask_storeu_epi16(dst + 2 * d + 32, k1, hi);
  }
}

// dst = x * s rounded to bfloat16 / float16 bits (n values)
template <bool kBf16>
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void scale_row_lowp_avx512(
    const float* x, float s, int64_t n, uint16_t* dst) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 k = lanes_below(n, d);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + d), vs);
    __m256i h;
    if constexpr (kBf16) {
      h = (__m256i)_mm512_cvtneps_pbh(v);
    } else {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_mask_storeu_epi16(dst + d, k, h);
  }
}

// See rope_row_lowp in microkernel.h. 8 pairs (16 values) per step: the 16-bit values widened
// to float32 (bfloat16: the high half of a float's bits; float16: vcvtph2ps), the pair
// partners swapped in-lane, the tables' 8 cosines and sines spread to both lanes of their
// pair, and out = mul * (x * c + swapped * (-+s)): x0 c + x1 (-s) is x0 c - x1 s exactly, and
// x1 c + x0 s is x0 s + x1 c. The products and sums use the _round_ intrinsics (builtins, not
// vector expressions) so that GCC cannot contract them into FMAs, which round once instead
// of twice and so differ from the reference's float32 rotation in the last bit. Rounded back
// as scale_row_lowp rounds. kMul: mul != 1 (times 1 is exact, so it is skipped). Full steps
// use all-ones masks (the loads and stores become plain ones), the last one masked: kp its
// pairs, kv their values.
template <bool kBf16, bool kMul>
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) inline void rope_step_avx512(
    const uint16_t* x, const float* c, const float* s, __m512 vmul, __mmask8 kp, __mmask16 kv,
    uint16_t* dst) {
  constexpr int kCur = _MM_FROUND_CUR_DIRECTION;
  const __m512i spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i neg_even = _mm512_setr_epi32(INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0,
                                             INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0,
                                             INT32_MIN, 0, INT32_MIN, 0);
  const __m256i h = _mm256_maskz_loadu_epi16(kv, x);
  const __m512 v = kBf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                         : _mm512_cvtph_ps(h);
  const __m512 cv =
      _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(_mm256_maskz_loadu_ps(kp, c)));
  const __m512 sv = _mm512_castsi512_ps(_mm512_xor_si512(
      neg_even, _mm512_castps_si512(_mm512_permutexvar_ps(
                    spread, _mm512_castps256_ps512(_mm256_maskz_loadu_ps(kp, s))))));
  const __m512 swapped = _mm512_permute_ps(v, 0xB1);  // lanes (1, 0, 3, 2, ...)
  __m512 out = _mm512_add_round_ps(_mm512_mul_round_ps(v, cv, kCur),
                                   _mm512_mul_round_ps(swapped, sv, kCur), kCur);
  if constexpr (kMul) out = _mm512_mul_round_ps(vmul, out, kCur);
  __m256i r;
  if constexpr (kBf16) {
    r = (__m256i)_mm512_cvtneps_pbh(out);
  } else {
    r = _mm512_cvtps_ph(out, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm256_mask_storeu_epi16(dst, kv, r);
}

template <bool kBf16, bool kMul>
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void rope_row_lowp_avx512(
    const uint16_t* x, const float* c, const float* s, int64_t pairs, float mul, uint16_t* dst) {
  const __m512 vmul = _mm512_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= pairs; i += 8) {
    rope_step_avx512<kBf16, kMul>(x + 2 * i, c + i, s + i, vmul, 0xFF, 0xFFFF, dst + 2 * i);
  }
  if (i < pairs) {
    const unsigned w = static_cast<unsigned>(pairs - i);
    rope_step_avx512<kBf16, kMul>(x + 2 * i, c + i, s + i, vmul, __mmask8((1u << w) - 1),
                                  __mmask16((1u << (2 * w)) - 1), dst + 2 * i);
  }
}

bool has_avx512_bw() {  // and VL
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
}

bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return yes;
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// ---- AVX2 + FMA (Zen 2/3, Haswell and later without AVX-512) ----
// One 6 x 16 tile of C: 12 ymm accumulators, two B vectors and one broadcast (15 of the 16
// registers). Full = the tile's 16 columns all exist: plain loads; otherwise masked loads
// (vmaskmovps is slower, so the full case is its own instantiation). Rows past R recompute
// row R - 1 and are not stored, as in the AVX-512 tile.
constexpr int MR2 = 6, NR2 = 16;

template <bool Full>
__attribute__((target("avx2,fma"))) void tile_avx2(int R, int64_t k, const float* a,
                                                   int64_t rs, int64_t cs, const float* b,
                                                   int64_t ldb, float* c, int64_t ldc,
                                                   __m256i m0, __m256i m1, bool accumulate) {
  ADAPERCEIVER_TILE_ROWS_6(ADAPERCEIVER_TILE_START, __m256, _mm256_setzero_ps)
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * ldb;
    const __m256 b0 = Full ? _mm256_loadu_ps(bp) : _mm256_maskload_ps(bp, m0);
    const __m256 b1 = Full ? _mm256_loadu_ps(bp + 8) : _mm256_maskload_ps(bp + 8, m1);
    const int64_t o = p * cs;
    ADAPERCEIVER_TILE_ROWS_6(ADAPERCEIVER_TILE_FMA, _mm256_set1_ps, _mm256_fmadd_ps)
  }
#define ADAPERCEIVER_PUT(r, ...)                                                   \
  if ((r) < R) {                                                                   \
    float* cr = c + (r) * ldc;                                                     \
    if (Full) {                                                                    \
      if (accumulate) {                                                            \
        c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(cr));                     \
        c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(cr + 8));                 \
      }                                                                            \
      _mm256_storeu_ps(cr, c##r##0);                                               \
      _mm256_storeu_ps(cr + 8, c##r##1);                                           \
    } else {                                                                       \
      if (accumulate) {                                                            \
        c##r##0 = _mm256_add_ps(c##r##0, _mm256_maskload_ps(cr, m0));              \
        c##r##1 = _mm256_add_ps(c##r##1, _mm256_maskload_ps(cr + 8, m1));          \
      }                                                                            \
      _mm256_maskstore_ps(cr, m0, c##r##0);                                        \
      _mm256_maskstore_ps(cr + 8, m1, c##r##1);                                    \
    }                                                                              \
  }
  ADAPERCEIVER_TILE_ROWS_6(ADAPERCEIVER_PUT, )
#undef ADAPERCEIVER_PUT
}

// lane mask of the first w (0..8) of 8 floats, for vmaskmovps
__attribute__((target("avx2"))) inline __m256i first_lanes(int64_t w) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(w)), idx);
}

__attribute__((target("avx2,fma"))) void small_gemm_avx2(int64_t m, int64_t n, int64_t k,
                                                        const float* a, int64_t rs, int64_t cs,
                                                        const float* b, int64_t ldb, float* c,
                                                        int64_t ldc, bool accumulate) {
  for (int64_t j0 = 0; j0 < n; j0 += NR2) {
    const int64_t w = n - j0 < NR2 ? n - j0 : NR2;
    const __m256i m0 = first_lanes(std::min<int64_t>(w, 8));
    const __m256i m1 = first_lanes(std::max<int64_t>(w - 8, 0));
    for (int64_t i0 = 0; i0 < m; i0 += MR2) {
      const int R = static_cast<int>(m - i0 < MR2 ? m - i0 : MR2);
      const float* ai = a + i0 * rs;
      float* ci = c + i0 * ldc + j0;
      if (w == NR2) {
        tile_avx2<true>(R, k, ai, rs, cs, b + j0, ldb, ci, ldc, m0, m1, accumulate);
      } else {
        tile_avx2<false>(R, k, ai, rs, cs, b + j0, ldb, ci, ldc, m0, m1, accumulate);
      }
    }
  }
}

// exp(x) for x <= 0, the same Cephes polynomial as exp512; 2^n through the exponent bits
// (x clamped to >= -87 keeps n + 127 >= 1, a normal float). NaN stays NaN (max_ps returns its
// second operand when either is NaN); -inf gives exactly 0.
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 is_ninf = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                                 _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(is_ninf, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// 8 floats from p, -inf in the lanes past the mask k (f: the same mask as floats)
__attribute__((target("avx2,fma"))) inline __m256 load_or_ninf(const float* p, __m256i k,
                                                               __m256 f) {
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(p, k), f);
}

// col_softmax of one block of 16 columns (c0..c0+15 of st, m_old, m_new, sum) as two 8-lane
// vectors. Full: all 16 exist, plain loads and stores; otherwise the lanes past the block's
// width w are loaded as -inf (max) or not stored (exp), so columns past cols are never touched.
// (vmaskmovps stores are microcoded on AMD Zen, ~10x slower than a plain store: the full case,
// every block of a 32-row query tile, is its own instantiation.)
template <bool Full>
__attribute__((target("avx2,fma"))) inline __m256 load_block(const float* p, __m256i k,
                                                             __m256 f) {
  return Full ? _mm256_loadu_ps(p) : load_or_ninf(p, k, f);
}

template <bool Full>
__attribute__((target("avx2,fma"))) inline void store_block(float* p, __m256i k, __m256 v) {
  if (Full) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, k, v);
  }
}

template <bool Full>
__attribute__((target("avx2,fma"))) void col_block_avx2(float* st, int64_t kc, int64_t ld,
                                                       int64_t w, const float* m_old,
                                                       float* m_new, float* sum) {
  const __m256i k0 = first_lanes(std::min<int64_t>(w, 8));
  const __m256i k1 = first_lanes(std::max<int64_t>(w - 8, 0));
  const __m256 f0 = _mm256_castsi256_ps(k0), f1 = _mm256_castsi256_ps(k1);
  __m256 mx0 = load_block<Full>(m_old, k0, f0), mx1 = load_block<Full>(m_old + 8, k1, f1);
  for (int64_t j = 0; j < kc; ++j) {
    const __m256 v0 = load_block<Full>(st + j * ld, k0, f0);
    const __m256 v1 = load_block<Full>(st + j * ld + 8, k1, f1);
    // NaN-sticky max, as in col_softmax_avx512
    mx0 = _mm256_blendv_ps(_mm256_max_ps(v0, mx0), v0, _mm256_cmp_ps(v0, v0, _CMP_UNORD_Q));
    mx1 = _mm256_blendv_ps(_mm256_max_ps(v1, mx1), v1, _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q));
  }
  // all -inf so far: subtract 0, not -inf (see col_softmax_avx512)
  const __m256 ninf = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
  const __m256 sub0 = _mm256_blendv_ps(mx0, zero, _mm256_cmp_ps(mx0, ninf, _CMP_EQ_OQ));
  const __m256 sub1 = _mm256_blendv_ps(mx1, zero, _mm256_cmp_ps(mx1, ninf, _CMP_EQ_OQ));
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < kc; ++j) {
    float* row = st + j * ld;
    // lanes past w load -inf and exp to 0; they are never stored (neither are their sums)
    const __m256 e0 = exp256(_mm256_sub_ps(load_block<Full>(row, k0, f0), sub0));
    const __m256 e1 = exp256(_mm256_sub_ps(load_block<Full>(row + 8, k1, f1), sub1));
    store_block<Full>(row, k0, e0);
    store_block<Full>(row + 8, k1, e1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
  }
  store_block<Full>(m_new, k0, mx0);
  store_block<Full>(m_new + 8, k1, mx1);
  store_block<Full>(sum, k0, s0);
  store_block<Full>(sum + 8, k1, s1);
}

__attribute__((target("avx2,fma"))) void col_softmax_avx2(float* st, int64_t kc, int64_t ld,
                                                         int64_t cols, const float* m_old,
                                                         float* m_new, float* sum) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t w = std::min<int64_t>(cols - c0, 16);
    if (w == 16) {
      col_block_avx2<true>(st + c0, kc, ld, w, m_old + c0, m_new + c0, sum + c0);
    } else {
      col_block_avx2<false>(st + c0, kc, ld, w, m_old + c0, m_new + c0, sum + c0);
    }
  }
}
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

void col_softmax_portable(float* st, int64_t kc, int64_t ld, int64_t cols, const float* m_old,
                          float* m_new, float* sum) {
  for (int64_t i = 0; i < cols; ++i) {
    float mx = m_old[i];
    for (int64_t j = 0; j < kc; ++j) {
      const float v = st[j * ld + i];
      mx = (std::isnan(v) || std::isnan(mx)) ? std::numeric_limits<float>::quiet_NaN()
                                             : std::max(mx, v);
    }
    // all -inf so far: subtract 0, not -inf (see col_softmax_avx512)
    const float sub = mx == -std::numeric_limits<float>::infinity() ? 0.f : mx;
    float s = 0.f;
    for (int64_t j = 0; j < kc; ++j) {
      const float e = std::exp(st[j * ld + i] - sub);
      st[j * ld + i] = e;
      s += e;
    }
    m_new[i] = mx;
    sum[i] = s;
  }
}

template <typename T>
float softmax_row_portable(const float* s, int64_t valid, int64_t width, float scale,
                           float m_old, float* m_new, uint16_t* p) {
  float m = m_old;
  for (int64_t j = 0; j < valid; ++j) {
    const float v = s[j] * scale;
    m = (std::isnan(v) || std::isnan(m)) ? std::numeric_limits<float>::quiet_NaN()
                                         : std::max(m, v);
  }
  *m_new = m;
  const float sub = m == -std::numeric_limits<float>::infinity() ? 0.f : m;
  float sum = 0.f;
  for (int64_t j = 0; j < width; ++j) {
    const T e = static_cast<T>(j < valid ? std::exp(s[j] * scale - sub) : 0.f);
    sum += static_cast<float>(e);
    p[j] = e.x;
  }
  return sum;
}

template <typename T>
void softmax_grad_row_portable(const float* s, const float* dp, int64_t valid, int64_t width,
                               float scale, float lse, float delta, uint16_t* p, uint16_t* ds) {
  for (int64_t j = 0; j < width; ++j) {
    const float e = j < valid ? std::exp(s[j] * scale - lse) : 0.f;
    p[j] = T(e).x;
    ds[j] = T(j < valid ? (dp[j] - delta) * e * scale : 0.f).x;
  }
}

void small_gemm_blas(int64_t m, int64_t n, int64_t k, const float* a, int64_t rs, int64_t cs,
                     const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // A is row-major (cs == 1) or column-major (rs == 1)
  const float beta = accumulate ? 1.f : 0.f;
  if (cs == 1) {
    gemm_rm(false, false, m, n, k, 1.f, a, rs, b, ldb, beta, c, ldc);
  } else {
    gemm_rm(true, false, m, n, k, 1.f, a, cs, b, ldb, beta, c, ldc);
  }
}

}  // namespace

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return has_avx512();
    case Isa::kAvx2: return has_avx2();
    case Isa::kPortable: return true;
  }
  return false;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kPortable: return "portable";
  }
  return "?";
}

// cpuinfo's flags, through ATen (the same detection oneDNN's dispatch relies on)
static bool cpu_flag(const char* name) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

namespace {

// What ADAPERCEIVER_CPU_ISA (read once) leaves the kernels: the microkernel's instruction set,
// and whether the low-precision attention may run its products in 16 bits, on AMX tiles or on
// AVX512-BF16 dot products ("amx" is AVX-512 plus those; "avx512" and lower turn them off).
struct IsaChoice {
  Isa isa;
  bool tiles;
  bool dots;
};

const IsaChoice& isa_choice() {
  static const IsaChoice choice = [] {
    const bool amx = has_avx512() && cpu_flag("amx_tile") && cpu_flag("amx_bf16");
    const bool dots = has_avx512() && cpu_flag("avx512_bf16") && cpu_flag("avx512_bw") &&
                      cpu_flag("avx512_vl");
    const Isa hw = has_avx512() ? Isa::kAvx512 : (has_avx2() ? Isa::kAvx2 : Isa::kPortable);
    const char* hw_name = amx ? "amx" : isa_name(hw);
    const std::string env = env_choice("ADAPERCEIVER_CPU_ISA");
    if (env.empty()) return IsaChoice{hw, amx, dots};
    const bool known = env == "amx" || env == "avx512" || env == "avx2" || env == "portable";
    TORCH_CHECK(known, "ADAPERCEIVER_CPU_ISA=", env, " is not allowed; allowed: amx, avx512, "
                "avx2, portable");
    const bool ok = env == "amx" ? amx
                    : env == "avx512" ? isa_supported(Isa::kAvx512)
                    : env == "avx2" ? isa_supported(Isa::kAvx2) : true;
    TORCH_CHECK(ok, "ADAPERCEIVER_CPU_ISA=", env, " is not supported by this CPU; allowed "
                "here: ", hw_name, " or a lower one (amx > avx512 > avx2 > portable)");
    if (env == "amx") return IsaChoice{Isa::kAvx512, true, dots};
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kPortable}) {
      if (env == isa_name(isa)) return IsaChoice{isa, false, false};
    }
    return IsaChoice{hw, amx, dots};
  }();
  return choice;
}

}  // namespace

Isa best_isa() { return isa_choice().isa; }

bool amx_tiles() { return isa_choice().tiles; }

bool bf16_dot_products() { return isa_choice().dots; }


bool native_bf16_gemm() {
  static const bool yes = best_isa() == Isa::kAvx512 &&
                          (cpu_flag("avx512_bf16") || cpu_flag("amx_bf16"));
  return yes;
}

bool native_fp16_gemm() {
  static const bool yes = best_isa() == Isa::kAvx512 &&
                          (cpu_flag("avx512_fp16") || cpu_flag("amx_fp16"));
  return yes;
}

namespace {

// the kernels of one instruction set, unchecked (the public overloads below check an Isa a
// caller names; the default ones take best_isa(), supported by construction, and run per tile)
void run_col_softmax(Isa isa, float* st, int64_t kc, int64_t ld, int64_t cols,
                     const float* m_old, float* m_new, float* sum) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == Isa::kAvx512 && cols <= 32) return col_softmax_avx512(st, kc, ld, cols, m_old, m_new, sum);
  if (isa == Isa::kAvx2) return col_softmax_avx2(st, kc, ld, cols, m_old, m_new, sum);
#endif
  col_softmax_portable(st, kc, ld, cols, m_old, m_new, sum);
}

void run_small_gemm(Isa isa, int64_t m, int64_t n, int64_t k, const float* a, int64_t rs,
                    int64_t cs, const float* b, int64_t ldb, float* c, int64_t ldc,
                    bool accumulate) {
  if (m == 0 || n == 0) return;
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == Isa::kAvx512) return small_gemm_avx512(m, n, k, a, rs, cs, b, ldb, c, ldc, accumulate);
  if (isa == Isa::kAvx2) return small_gemm_avx2(m, n, k, a, rs, cs, b, ldb, c, ldc, accumulate);
#endif
  small_gemm_blas(m, n, k, a, rs, cs, b, ldb, c, ldc, accumulate);
}

}  // namespace

void col_softmax(Isa isa, float* st, int64_t kc, int64_t ld, int64_t cols, const float* m_old,
                 float* m_new, float* sum) {
  TORCH_CHECK(isa_supported(isa), "col_softmax: this CPU lacks the requested instruction set");
  run_col_softmax(isa, st, kc, ld, cols, m_old, m_new, sum);
}

void small_gemm(Isa isa, int64_t m, int64_t n, int64_t k, const float* a, int64_t rs,
                int64_t cs, const float* b, int64_t ldb, float* c, int64_t ldc,
                bool accumulate) {
  TORCH_CHECK(isa_supported(isa), "small_gemm: this CPU lacks the requested instruction set");
  run_small_gemm(isa, m, n, k, a, rs, cs, b, ldb, c, ldc, accumulate);
}

void pack_pairs_transposed(const uint16_t* const* rows, int64_t nrows, int64_t npairs,
                           uint16_t* dst, int64_t ld) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (best_isa() == Isa::kAvx512) return pack_pairs_transposed_avx512(rows, nrows, npairs, dst, ld);
#endif
  for (int64_t i = 0; i < npairs; ++i)
    for (int64_t j = 0; j < nrows; ++j)
      std::copy(rows[j] + 2 * i, rows[j] + 2 * i + 2, dst + (i * ld + j) * 2);
}

void interleave_pair(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* dst) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (best_isa() == Isa::kAvx512 && has_avx512_bw()) return interleave_pair_avx512(a, b, n, dst);
#endif
  for (int64_t d = 0; d < n; ++d) dst[2 * d] = a[d], dst[2 * d + 1] = b ? b[d] : uint16_t(0);
}

void scale_row_lowp(bool bf16, const float* x, float s, int64_t n, uint16_t* dst) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (best_isa() == Isa::kAvx512 && has_avx512_bf16() && has_avx512_bw()) {
    return bf16 ? scale_row_lowp_avx512<true>(x, s, n, dst)
                : scale_row_lowp_avx512<false>(x, s, n, dst);
  }
#endif
  for (int64_t d = 0; d < n; ++d) {
    dst[d] = bf16 ? c10::BFloat16(x[d] * s).x : c10::Half(x[d] * s).x;
  }
}

namespace {

// The rotation value by value (see rope_row_lowp in microkernel.h). The products are rounded
// one by one as long as nothing contracts them: the baseline x86-64 this file is built for has
// no FMA (on other architectures, where GCC may fuse them, only this path exists).
template <typename T>
void rope_row_lowp_portable(const uint16_t* x, const float* c, const float* s, int64_t pairs,
                            float mul, uint16_t* dst) {
  for (int64_t i = 0; i < pairs; ++i) {
    const float x0 = static_cast<float>(T(x[2 * i], T::from_bits()));
    const float x1 = static_cast<float>(T(x[2 * i + 1], T::from_bits()));
    dst[2 * i] = T(mul * (x0 * c[i] - x1 * s[i])).x;
    dst[2 * i + 1] = T(mul * (x0 * s[i] + x1 * c[i])).x;
  }
}

void run_rope_row_lowp(bool vectorised, bool bf16, const uint16_t* x, const float* c,
                       const float* s, int64_t pairs, float mul, uint16_t* dst) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vectorised) {
    const bool times = mul != 1.f;
    if (bf16) {
      return times ? rope_row_lowp_avx512<true, true>(x, c, s, pairs, mul, dst)
                   : rope_row_lowp_avx512<true, false>(x, c, s, pairs, mul, dst);
    }
    return times ? rope_row_lowp_avx512<false, true>(x, c, s, pairs, mul, dst)
                 : rope_row_lowp_avx512<false, false>(x, c, s, pairs, mul, dst);
  }
#endif
  return bf16 ? rope_row_lowp_portable<c10::BFloat16>(x, c, s, pairs, mul, dst)
              : rope_row_lowp_portable<c10::Half>(x, c, s, pairs, mul, dst);
}

}  // namespace

bool rope_row_lowp_supported(Isa isa) {
  if (isa != Isa::kAvx512) return isa_supported(isa);
#if defined(__x86_64__) && defined(__GNUC__)
  return has_avx512() && has_avx512_bf16() && has_avx512_bw();
#else
  return false;
#endif
}

void rope_row_lowp(Isa isa, bool bf16, const uint16_t* x, const float* c, const float* s,
                   int64_t pairs, float mul, uint16_t* dst) {
  TORCH_CHECK(rope_row_lowp_supported(isa), "rope_row_lowp: this CPU lacks the instruction set ",
              isa_name(isa), (isa == Isa::kAvx512 ? " (with AVX512-BF16 and AVX512-BW)" : ""));
  run_rope_row_lowp(isa == Isa::kAvx512, bf16, x, c, s, pairs, mul, dst);
}

void rope_row_lowp(bool bf16, const uint16_t* x, const float* c, const float* s, int64_t pairs,
                   float mul, uint16_t* dst) {
  static const bool vectorised = best_isa() == Isa::kAvx512 && rope_row_lowp_supported(Isa::kAvx512);
  run_rope_row_lowp(vectorised, bf16, x, c, s, pairs, mul, dst);
}

float softmax_row_lowp(bool bf16, const float* s, int64_t valid, int64_t width, float scale,
                       float m_old, float* m_new, uint16_t* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (best_isa() == Isa::kAvx512 && has_avx512_bf16() && has_avx512_bw()) {
    return bf16 ? softmax_row_avx512<true>(s, valid, width, scale, m_old, m_new, p)
                : softmax_row_avx512<false>(s, valid, width, scale, m_old, m_new, p);
  }
#endif
  return bf16 ? softmax_row_portable<c10::BFloat16>(s, valid, width, scale, m_old, m_new, p)
              : softmax_row_portable<c10::Half>(s, valid, width, scale, m_old, m_new, p);
}

void softmax_grad_row_lowp(bool bf16, const float* s, const float* dp, int64_t valid,
                           int64_t width, float scale, float lse, float delta, uint16_t* p,
                           uint16_t* ds) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (best_isa() == Isa::kAvx512 && has_avx512_bf16() && has_avx512_bw()) {
    return bf16 ? softmax_grad_row_avx512<true>(s, dp, valid, width, scale, lse, delta, p, ds)
                : softmax_grad_row_avx512<false>(s, dp, valid, width, scale, lse, delta, p, ds);
  }
#endif
  return bf16 ? softmax_grad_row_portable<c10::BFloat16>(s, dp, valid, width, scale, lse, delta,
                                                         p, ds)
              : softmax_grad_row_portable<c10::Half>(s, dp, valid, width, scale, lse, delta, p,
                                                     ds);
}

void col_softmax(float* st, int64_t kc, int64_t ld, int64_t cols, const float* m_old,
                 float* m_new, float* sum) {
  run_col_softmax(best_isa(), st, kc, ld, cols, m_old, m_new, sum);
}

void small_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t rs, int64_t cs,
                const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  run_small_gemm(best_isa(), m, n, k, a, rs, cs, b, ldb, c, ldc, accumulate);
}

}  // namespace cpu
}  // namespace adaperceiver
