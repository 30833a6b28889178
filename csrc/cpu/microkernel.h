// A small GEMM for the attention tiles: C (m x n, ldc) (+)= A (m x k) B (k x n, row-major ldb),
// A read through strides (element (i, p) at a[i * rs + p * cs]), so both K (row-major) and the
// transposed probability block are read in place. Register tiles, B rows loaded once per k step
// and A elements broadcast: AVX-512 8 rows x 32 columns (16 zmm accumulators), AVX2 + FMA 6 x 16
// (12 ymm accumulators); column tails use masked loads and stores. Other machines take the BLAS
// sgemm_ path (same result up to rounding). Why not BLAS everywhere: for these shapes (k = 64,
// m, n <= 512) MKL's packing and call overhead cost more than the product itself.
// The instruction set is picked once (best_isa); the overloads taking an Isa exist so that a
// test can run every path this CPU supports.
#pragma once

#include <cstdint>

namespace adaperceiver {
namespace cpu {

enum class Isa { kAvx512, kAvx2, kPortable };
bool isa_supported(Isa isa);
const char* isa_name(Isa isa);  // "avx512", "avx2", "portable"
// AVX-512 when the CPU has it, else AVX2 + FMA, else portable. ADAPERCEIVER_CPU_ISA=amx /
// avx512 / avx2 / portable in the environment (read once) picks a lower one (amx is AVX-512
// plus the AMX tiles), so that the paths a CPU without AMX or AVX-512 takes can be run and
// tested here; a higher one than the CPU has is an error.
Isa best_isa();
// The bfloat16 / float16 attention may run on AMX tiles: the CPU has AMX-BF16 and
// ADAPERCEIVER_CPU_ISA is unset or amx (the attention also asks cpublas, per call).
bool amx_tiles();
// The bfloat16 attention may run its products on AVX512-BF16 dot products (oneDNN's brgemm
// generates them where there are no AMX tiles): the CPU has AVX512-BF16, -BW and -VL and
// ADAPERCEIVER_CPU_ISA is unset or amx. Like the tiles, "avx512" and lower turn them off, so
// the float32-inside attention can be run and tested on every CPU.
bool bf16_dot_products();

// bfloat16 (float16) GEMMs run natively: the CPU has AVX512-BF16 or AMX-BF16 (AVX512-FP16 or
// AMX-FP16) and best_isa() is AVX-512. Then the FFN runs those dtypes as they are through
// oneDNN; otherwise it computes in float32 (a bfloat16 GEMM without the hardware is emulated,
// slower than float32).
bool native_bf16_gemm();
bool native_fp16_gemm();

// The lanes [j, j + 16) of a row of n values that lie below n, as an AVX-512 16-lane mask
// (bit i: lane j + i); every vector loop over rows with masked tails takes its masks from here.
inline uint16_t lanes_below(int64_t n, int64_t j) {
  return n - j >= 16 ? uint16_t(0xFFFF) : n > j ? uint16_t((1u << (n - j)) - 1) : uint16_t(0);
}

// The same for the 32 lanes [j, j + 32) of 16-bit values (an AVX-512 32-lane mask).
inline uint32_t lanes32_below(int64_t n, int64_t j) {
  return n - j >= 32 ? 0xFFFFFFFFu : n > j ? (1u << (n - j)) - 1 : 0u;
}

// accumulate=false: C = A B; accumulate=true: C += A B.
void small_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t rs, int64_t cs,
                const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
void small_gemm(Isa isa, int64_t m, int64_t n, int64_t k, const float* a, int64_t rs,
                int64_t cs, const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

// Online-softmax step on a transposed score block st (kc x ld; query i in column i, cols <= 32):
// m_new[i] = max(m_old[i], max_j st[j][i]); st[j][i] = exp(st[j][i] - m_new[i]);
// sum[i] = sum_j st[j][i]. Entries set to -inf (masked) become 0 (up to 1e-38).
void col_softmax(float* st, int64_t kc, int64_t ld, int64_t cols, const float* m_old,
                 float* m_new, float* sum);
void col_softmax(Isa isa, float* st, int64_t kc, int64_t ld, int64_t cols, const float* m_old,
                 float* m_new, float* sum);

// Online-softmax step on one score row for the AMX attention (s: width float32 scores, row-major
// blocks): m_new = max(m_old, scale * s[j] for j < valid), NaN-sticky; p[j] = exp(scale * s[j] -
// m_new) rounded to bfloat16 (bf16) or float16 bits for j < valid (m_new = -inf subtracts 0, so
// masked scores give 0), p[j] = 0 for valid <= j < width. Returns the sum of the rounded p[j]
// (the weights the value product will use).
float softmax_row_lowp(bool bf16, const float* s, int64_t valid, int64_t width, float scale,
                       float m_old, float* m_new, uint16_t* p);

// Backward row of the AMX attention (s: width float32 scores, dp: dO V^T's row): for j < valid
// p[j] = exp(scale * s[j] - lse) and ds[j] = (dp[j] - delta) p[j] scale, in float32, each
// rounded to bfloat16 (bf16) or float16 bits; p[j] = ds[j] = 0 for valid <= j < width.
void softmax_grad_row_lowp(bool bf16, const float* s, const float* dp, int64_t valid,
                           int64_t width, float scale, float lse, float delta, uint16_t* p,
                           uint16_t* ds);

// Packing for the AMX attention (16-bit values as bits). pack_pairs_transposed: nrows (<= 16)
// rows of 2 * npairs values to the VNNI layout of their transpose, row j's pair i at
// dst[(i * ld + j) * 2 + {0, 1}] (keys as the columns of K^T). interleave_pair: two rows a, b
// (b null: zeros) of n values to one VNNI pair row, dst[2d] = a[d], dst[2d + 1] = b[d].
// scale_row_lowp: dst = x * s rounded to bfloat16 (bf16) or float16 bits.
void pack_pairs_transposed(const uint16_t* const* rows, int64_t nrows, int64_t npairs,
                           uint16_t* dst, int64_t ld);
void interleave_pair(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* dst);
void scale_row_lowp(bool bf16, const float* x, float s, int64_t n, uint16_t* dst);

// RoPE of one row of 16-bit values for the AMX attention (bits of bfloat16 (bf16) or float16):
// its pairs (x[2i], x[2i+1]), i < pairs, rotated by the angle whose cosine and sine are c[i],
// s[i], times mul, rounded once to the 16-bit type:
//   dst[2i] = round(mul * (x0 c - x1 s)), dst[2i+1] = round(mul * (x0 s + x1 c)),
// in float32 with every product and sum rounded (no fused multiply-add): the reference's
// float32 rotation (ops/reference.py apply_rope) rounded once, bit for bit (a NaN is a NaN,
// its payload aside). dst may be x. The Isa overload exists for tests: kAvx512 is the one-pass
// AVX-512 body (it needs AVX512-BF16 and -BW, as every CPU with AMX has), the others the
// portable loop (convert, rotate, round value by value).
void rope_row_lowp(bool bf16, const uint16_t* x, const float* c, const float* s, int64_t pairs,
                   float mul, uint16_t* dst);
void rope_row_lowp(Isa isa, bool bf16, const uint16_t* x, const float* c, const float* s,
                   int64_t pairs, float mul, uint16_t* dst);
bool rope_row_lowp_supported(Isa isa);

// Row-major GEMM through BLAS: C = alpha * op(A) op(B) + beta * C.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
             int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace cpu
}  // namespace adaperceiver
