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
// AVX-512 when the CPU has it, else AVX2 + FMA, else portable. ADAPERCEIVER_CPU_ISA=avx512 /
// avx2 / portable in the environment (read once) picks a lower one, so that the paths a CPU
// without AVX-512 takes can be run and tested here; a higher one than the CPU has is an error.
Isa best_isa();

// bfloat16 (float16) GEMMs run natively: the CPU has AVX512-BF16 or AMX-BF16 (AVX512-FP16 or
// AMX-FP16) and best_isa() is AVX-512. Then the FFN runs those dtypes as they are through
// oneDNN; otherwise it computes in float32 (a bfloat16 GEMM without the hardware is emulated,
// slower than float32).
bool native_bf16_gemm();
bool native_fp16_gemm();

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

// Row-major GEMM through BLAS: C = alpha * op(A) op(B) + beta * C.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
             int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace cpu
}  // namespace adaperceiver
