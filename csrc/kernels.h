// Declarations of the kernels behind the adaperceiver::* backend ops (see ops.cpp for the
// schemas). The CPU ones are always compiled; the CUDA ones only when ADAPERCEIVER_WITH_CUDA.
#pragma once

#include <ATen/ATen.h>

#include "build_facts.h"

#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace adaperceiver {

using OptT = c10::optional<at::Tensor>;

// Each op's parameters in its schema's order (ops.cpp). The CPU kernels (cpu/) and the CUDA
// kernels (cuda/) are declared and defined with these lists, so neither can drift from the
// schema or from the other.
#define ADAPERCEIVER_ATTENTION_FWD_PARAMS                                                   \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,                           \
      at::OptionalIntArrayRef token_grans, double scale, const OptT &seq_lens,             \
      const OptT &q_cos, const OptT &q_sin, const OptT &k_cos, const OptT &k_sin
#define ADAPERCEIVER_ATTENTION_BWD_PARAMS                                                   \
  const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, \
      const at::Tensor &out, const at::Tensor &lse, at::OptionalIntArrayRef token_grans,    \
      double scale, const OptT &seq_lens, const OptT &q_cos, const OptT &q_sin,            \
      const OptT &k_cos, const OptT &k_sin
// self-attention over packed rows (R, H, D), sample b's rows following sample b-1's
#define ADAPERCEIVER_ATTENTION_VARLEN_FWD_PARAMS                                            \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::IntArrayRef seq_lens,  \
      at::OptionalIntArrayRef token_grans, double scale, const OptT &q_cos,                \
      const OptT &q_sin, const OptT &k_cos, const OptT &k_sin
#define ADAPERCEIVER_FFN_FWD_PARAMS                                                         \
  const at::Tensor &x, const at::Tensor &w1, const at::Tensor &b1, const at::Tensor &w2,    \
      const at::Tensor &b2, at::IntArrayRef hidden
#define ADAPERCEIVER_FFN_BWD_PARAMS const at::Tensor &grad_out, ADAPERCEIVER_FFN_FWD_PARAMS

// The ops' kernels of one device (namespace cpu or cuda) ...
#define ADAPERCEIVER_DECLARE_OP_KERNELS                                                     \
  std::tuple<at::Tensor, at::Tensor> attention_fwd(ADAPERCEIVER_ATTENTION_FWD_PARAMS);      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(                             \
      ADAPERCEIVER_ATTENTION_BWD_PARAMS);                                                   \
  std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(                                  \
      ADAPERCEIVER_ATTENTION_VARLEN_FWD_PARAMS);                                            \
  at::Tensor ffn_fwd(ADAPERCEIVER_FFN_FWD_PARAMS);                                          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(           \
      ADAPERCEIVER_FFN_BWD_PARAMS);

// ... and their registration for its dispatch key (ops.cpp: CPU; cuda/register.cpp: CUDA)
#define ADAPERCEIVER_IMPL_OP_KERNELS(m, ns)                                                 \
  m.impl("block_masked_attention_fwd", &adaperceiver::ns::attention_fwd);                   \
  m.impl("block_masked_attention_bwd", &adaperceiver::ns::attention_bwd);                   \
  m.impl("block_masked_attention_varlen_fwd", &adaperceiver::ns::attention_varlen_fwd);     \
  m.impl("matryoshka_ffn_fwd", &adaperceiver::ns::ffn_fwd);                                 \
  m.impl("matryoshka_ffn_bwd", &adaperceiver::ns::ffn_bwd);

namespace cpu {
ADAPERCEIVER_DECLARE_OP_KERNELS
// Why bfloat16 / float16 products of head dims (D, Dv) do not run on AMX tiles here (empty:
// they do). The FFN's one-pair rule for small batches (ffn_banded.cpp, padded_pair) and the
// per-thread row blocks (cpu/gemm_lowp.cpp) read it: where it is empty, oneDNN runs the dtype's
// GEMMs on the same tiles.
std::string tiles_why_not(at::ScalarType dtype, int64_t D, int64_t Dv);
// Why the bfloat16 / float16 attention (forward and backward) of head dims (D, Dv) does not run
// its products in the dtype here (empty: it does), on AMX tiles or, for bfloat16 without them,
// on AVX512-BF16 dot products (both through torch's cpublas::brgemm, which an exact probe
// product checks once per process and dtype); else it computes in float32. attention_path
// summarizes it for build_info: "amx", "avx512-bf16" or "float32"; build_info also gives the
// reason.
std::string lowp_attention_why_not(at::ScalarType dtype, int64_t D, int64_t Dv);
const char* attention_path(at::ScalarType dtype);
// csrc/cpu/gemm_lowp.cpp: x (..., K) weight (N, K)^T + bias as oneDNN GEMMs on consecutive
// row blocks of `block` rows run in parallel (one thread each); float32 -> bfloat16 rounded as
// c10::BFloat16 rounds, in parallel
at::Tensor linear_row_blocks(const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                             int64_t block);
at::Tensor to_bfloat16(const at::Tensor& x);
// csrc/cpu/norm.cpp: (x + gamma * branch, LayerNorm of it) in one pass over the rows
std::tuple<at::Tensor, at::Tensor> residual_layer_norm(const at::Tensor& x, const OptT& branch,
                                                       const OptT& gamma, const OptT& weight,
                                                       const OptT& bias, double eps,
                                                       bool normalize,
                                                       std::optional<at::ScalarType> norm_dtype);
}  // namespace cpu

// csrc/cuda (registered by cuda/register.cpp; defined only when ADAPERCEIVER_WITH_CUDA); the
// FFN backward is the banded ATen backward (ffn_banded.h) on the samples ordered widest first
// on the device
namespace cuda {
ADAPERCEIVER_DECLARE_OP_KERNELS
}  // namespace cuda

}  // namespace adaperceiver
