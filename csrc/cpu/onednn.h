// oneDNN's matmul on a plain (unpacked) weight, mkldnn::_linear_pointwise: the one way the
// extension calls it (defined in cpu/gemm_lowp.cpp).
//
// The library the model's float32 CPU projections use (adaperceiver/ops/linear.py says why:
// MKL takes a generic path on AMD CPUs) and the one that runs bfloat16 / float16 GEMMs on
// AMX / AVX512-BF16 / AVX512-FP16. Looked up once; unavailable when this torch has no oneDNN
// or ADAPERCEIVER_CPU_GEMM=mkl (read as ops/linear.py reads it: surrounding blanks and case
// ignored), so the FFN, the column blocks and the projections always agree on the library.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <optional>

namespace adaperceiver {
namespace cpu {

// What oneDNN applies to the float32 product (plus bias) before the one rounding to the
// output dtype: nothing, or the exact (erf) GELU.
enum class PostOp { kNone, kGelu };

// Whether onednn_linear runs (oneDNN present and not switched off).
bool onednn_linear_available();

// x (M, K) times weight (N, K) transposed, plus bias (N,) when given, then post_op: a new
// (M, N) tensor in x's dtype, one oneDNN GEMM with float32 accumulation. nullopt when
// !onednn_linear_available(). A strided weight (a column slice) is made contiguous first:
// oneDNN would run it on its reference kernel, orders of magnitude slower.
std::optional<at::Tensor> onednn_linear(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        PostOp post_op = PostOp::kNone);

}  // namespace cpu
}  // namespace adaperceiver
