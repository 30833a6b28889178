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

namespace cpu {
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 at::OptionalIntArrayRef token_grans, double scale,
                                                 const OptT& seq_lens, const OptT& q_cos,
                                                 const OptT& q_sin, const OptT& k_cos,
                                                 const OptT& k_sin);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, at::OptionalIntArrayRef token_grans,
    double scale, const OptT& seq_lens, const OptT& q_cos, const OptT& q_sin, const OptT& k_cos,
    const OptT& k_sin);
// self-attention over packed rows (R, H, D), sample b's rows following sample b-1's
std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        at::IntArrayRef seq_lens,
                                                        at::OptionalIntArrayRef token_grans,
                                                        double scale, const OptT& q_cos,
                                                        const OptT& q_sin, const OptT& k_cos,
                                                        const OptT& k_sin);
// Why the bfloat16 / float16 forward of head dims (D, Dv) does not run on AMX tiles here
// (empty: it does): "amx" or "float32" is attention_path's summary for build_info.
std::string tiles_why_not(at::ScalarType dtype, int64_t D, int64_t Dv);
const char* attention_path(at::ScalarType dtype);
at::Tensor ffn_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden);
// csrc/cpu/gemm_lowp.cpp: x (..., K) weight (N, K)^T + bias as oneDNN GEMMs on column blocks
// of `block` outputs run in parallel (one thread each); float32 -> bfloat16 rounded as
// c10::BFloat16 rounds, in parallel
at::Tensor linear_column_blocks(const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                                int64_t block);
at::Tensor to_bfloat16(const at::Tensor& x);
}  // namespace cpu

// csrc/cuda (registered by cuda/register.cpp; defined only when ADAPERCEIVER_WITH_CUDA): the
// same arguments as the CPU kernels above
namespace cuda {
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, at::OptionalIntArrayRef,
                                                 double, const OptT&, const OptT&, const OptT&,
                                                 const OptT&, const OptT&);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, at::OptionalIntArrayRef, double, const OptT&,
    const OptT&, const OptT&, const OptT&, const OptT&);
std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, at::IntArrayRef,
                                                        at::OptionalIntArrayRef, double,
                                                        const OptT&, const OptT&, const OptT&,
                                                        const OptT&);
at::Tensor ffn_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, at::IntArrayRef);
// the banded ATen backward (ffn_banded.h) on the samples ordered widest first on the device
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, at::IntArrayRef);
}  // namespace cuda

}  // namespace adaperceiver
