// oneDNN's linear (cpu/onednn.h: the one lookup and call of mkldnn::_linear_pointwise) and two
// helpers of the bfloat16 projections (adaperceiver/ops/linear.py says when each runs).
//
// linear_row_blocks(x, weight, bias, block): out (M, N) = x (M, K) weight^T + bias as oneDNN's
// matmul (mkldnn::_linear_pointwise on the plain weight) on consecutive row blocks of `block`
// rows: at::parallel_for hands each thread whole blocks, each block one oneDNN call run on that
// thread alone (inside the parallel region oneDNN sees one thread), copied into its rows of out
// on the same thread. Why and when: gemm_thread_rows in cpu/onednn.h. Each output is one oneDNN
// sum over the full K in float32, rounded once, as in one call on all the rows. With oneDNN
// switched off (ADAPERCEIVER_CPU_GEMM=mkl) the blocks run as ATen's linear.
// What it skips: nothing is cached between calls (each call reorders the weight, as oneDNN's
// own call does), so an in-place weight edit is always seen.
//
// to_bfloat16(x): float32 -> bfloat16, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's
// rounding, bit for bit), AVX-512 BW in parallel chunks: the casts autocast makes of every
// float32 weight on every call, where Tensor.to's conversion is slower. A matrix of unit column
// stride (a column slice) converts row by row; other strided inputs are made contiguous first.
//
// Why not a GEMM of our own on cpublas::brgemm (oneDNN's AMX ukernel) with per-call VNNI
// packing: at the model's shapes its brgemm calls alone run well below oneDNN's matmul rate
// (benchmarks/README.md, "GEMMs in bf16").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>

#include "common.h"
#include "kernels.h"
#include "cpu/microkernel.h"
#include "cpu/onednn.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace adaperceiver {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// 16 float32 lanes -> bfloat16 bits with c10::BFloat16's rounding (round_to_nearest_even, NaN
// -> 0x7FC0), in the low halves of 32-bit lanes
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i bf16_rne32(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
}

// the same narrowed to 16 bfloat16 values
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i bf16_rne(__m512 v) {
  return _mm512_cvtepi32_epi16(bf16_rne32(v));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void to_bf16_avx512(const float* src,
                                                                         int64_t n,
                                                                         uint16_t* dst) {
  int64_t d = 0;
  // 32 values a step: two conversions packed into one 64-byte store (packus works per 128-bit
  // lane, the permutation puts the lanes back in order)
  const __m512i order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
  for (; d + 32 <= n; d += 32) {
    const __m512i lo = bf16_rne32(_mm512_loadu_ps(src + d));
    const __m512i hi = bf16_rne32(_mm512_loadu_ps(src + d + 16));
    _mm512_storeu_si512(dst + d, _mm512_permutexvar_epi64(order, _mm512_packus_epi32(lo, hi)));
  }
  for (; d + 16 <= n; d += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), bf16_rne(_mm512_loadu_ps(src + d)));
  }
  if (d < n) {
    const __mmask16 k = lanes_below(n, d);
    _mm256_mask_storeu_epi16(dst + d, k, bf16_rne(_mm512_maskz_loadu_ps(k, src + d)));
  }
}

bool avx512_bw() {
  static const bool yes = best_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}
#endif

void to_bf16(const float* src, int64_t n, uint16_t* dst) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx512_bw()) return to_bf16_avx512(src, n, dst);
#endif
  for (int64_t d = 0; d < n; ++d) dst[d] = c10::BFloat16(src[d]).x;
}

// mkldnn::_linear_pointwise, nullptr when this torch has no oneDNN or ADAPERCEIVER_CPU_GEMM=mkl
// (ops/linear.py rejects other values at import)
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    if (env_choice("ADAPERCEIVER_CPU_GEMM") == "mkl" || !at::hasMKLDNN()) return std::nullopt;
    return c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  }();
  return op ? &*op : nullptr;
}

}  // namespace

bool onednn_linear_available() { return onednn_linear_op() != nullptr; }

std::optional<at::Tensor> onednn_linear(const at::Tensor& x, const at::Tensor& weight,
                                        const OptT& bias, PostOp post_op) {
  const c10::OperatorHandle* op = onednn_linear_op();
  if (!op) return std::nullopt;
  // the op's attr and algorithm arguments: "none" / "" (no post-op), "gelu" / "none" (erf)
  const bool gelu = post_op == PostOp::kGelu;
  torch::jit::Stack stack{x, weight.contiguous(), bias, std::string(gelu ? "gelu" : "none"),
                          c10::List<std::optional<at::Scalar>>(),
                          std::string(gelu ? "none" : "")};
  op->callBoxed(stack);
  return stack[0].toTensor();
}

// The band of gemm_row_chunks (cpu/onednn.h): 768 < outputs <= 1100 on 800..1663 rows
constexpr int64_t kBandLo = 800, kBandHi = 1664, kOutLo = 768, kOutHi = 1100;

int64_t gemm_row_chunks(int64_t rows, int64_t outputs, at::ScalarType dtype) {
  constexpr int64_t kChunkRows = 768;
  if (dtype != at::kBFloat16 || at::in_parallel_region() || at::get_num_threads() != 2 ||
      !native_bf16_gemm() || !onednn_linear_available()) {
    return 1;
  }
  if (outputs <= kOutLo || outputs > kOutHi || rows < kBandLo || rows >= kBandHi) return 1;
  return (rows + kChunkRows - 1) / kChunkRows;
}

namespace {
// Whether the per-thread row-block rules (cpu/onednn.h) can apply at all: bfloat16 at 2
// threads outside a parallel region, oneDNN in use, AMX tiles for bfloat16.
bool thread_rows_apply(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && !at::in_parallel_region() && at::get_num_threads() == 2 &&
         native_bf16_gemm() && onednn_linear_available() &&
         tiles_why_not(at::kBFloat16, 64, 64).empty();
}

// rows per block of one block per thread: half the rows rounded up to 32
int64_t half_rows(int64_t rows) { return ((rows + 1) / 2 + 31) / 32 * 32; }
}  // namespace

int64_t gemm_thread_rows(int64_t rows, int64_t outputs, at::ScalarType dtype) {
  constexpr int64_t kWideHi = 1280;  // outputs > kOutHi: rows kBandLo..kWideHi - 1
  // the one-thread band on any CPU with native bf16 GEMMs (there both threads must work)
  if (gemm_row_chunks(rows, outputs, dtype) > 1) return half_rows(rows);
  if (outputs <= kOutHi || !thread_rows_apply(dtype)) return 0;
  return rows >= kBandLo && rows < kWideHi ? half_rows(rows) : 0;
}

int64_t ffn_thread_rows(int64_t rows, at::ScalarType dtype) {
  constexpr int64_t kLo = 768, kHi = 2048;
  return rows >= kLo && rows < kHi && thread_rows_apply(dtype) ? half_rows(rows) : 0;
}

at::Tensor to_bfloat16(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "to_bfloat16: x must be a float32 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
  if (x.dim() == 2 && x.stride(1) == 1 && !x.is_contiguous() && x.numel() > 0) {
    // a column slice (a Matryoshka width of fc2's weight): row by row, no float32 copy first
    const int64_t R = x.size(0), C = x.size(1), ld = x.stride(0);
    at::Tensor out = at::empty({R, C}, x.options().dtype(at::kBFloat16));
    const float* s = x.data_ptr<float>();
    uint16_t* d = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    at::parallel_for(0, R, std::max<int64_t>(1, (int64_t(1) << 15) / C), [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) to_bf16(s + r * ld, C, d + r * C);
    });
    return out;
  }
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(at::kBFloat16));
  const float* s = src.data_ptr<float>();
  uint16_t* d = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, src.numel(), int64_t(1) << 15,
                   [&](int64_t a, int64_t b) { to_bf16(s + a, b - a, d + a); });
  return out;
}

at::Tensor linear_row_blocks(const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                             int64_t block) {
  TORCH_CHECK(block > 0, "linear_row_blocks: block must be positive, got ", block);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "linear_row_blocks: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1),
              "linear_row_blocks: x (..., K) and weight (N, K) must agree on K; got x ",
              x.sizes(), ", weight ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(),
              "linear_row_blocks: x and weight must have one dtype, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  const int64_t K = weight.size(1), N = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type(),
                "linear_row_blocks: bias must be (", N, ",) in ", x.scalar_type(), ", got ",
                bias->sizes(), " in ", bias->scalar_type());
  }
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const at::Tensor w = weight.contiguous();
  const OptT b = has_bias ? OptT(bias->contiguous()) : OptT();
  const int64_t M = x2.size(0), es = x2.element_size();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty({M, N}, x2.options());
  if (M == 0 || N == 0) return out.view(shape);
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, (M + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    c10::InferenceMode guard;  // the block products are temporaries no autograd will see
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t r0 = i * block, n = std::min(block, M - r0);
      const at::Tensor xb = x2.narrow(0, r0, n);
      std::optional<at::Tensor> y1 = onednn_linear(xb, w, b);
      const at::Tensor y = (y1 ? *y1 : at::linear(xb, w, b)).contiguous();
      std::memcpy(dst + r0 * N * es, y.data_ptr(), n * N * es);  // rows r0.. of out, whole
    }
  });
  return out.view(shape);
}

}  // namespace cpu
}  // namespace adaperceiver
