// The Matryoshka FFN in nested width bands, written with ATen GEMMs (device-generic: the CPU
// backend runs both directions through it, the CUDA build its backward).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace adaperceiver {

namespace cpu {
// act (rows, h) float32 contiguous, on the CPU, bias (h,): act = GELU(act + bias) in place.
void bias_gelu_(at::Tensor& act, const at::Tensor& bias);
// The elementwise pass of the low-precision backward, on the CPU, bfloat16 / float16:
// g, pre (rows, u) contiguous, dpre (rows, u) of unit column stride (a column slice).
// dpre = gelu_backward(g, pre) and pre = GELU(pre) in place, each rounded once from float32;
// returns the column sums of the rounded dpre, float32 (u,).
at::Tensor gelu_backward_lowp_(const at::Tensor& g, at::Tensor& pre, at::Tensor& dpre);
// m (rows, n) bfloat16 / float16 of unit column stride: its column sums, float32 (n,).
// Both sum in fixed chunks of rows added in order (a function of the shape only).
at::Tensor column_sums(const at::Tensor& m);
}  // namespace cpu

at::Tensor ffn_fwd_banded(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_banded(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden);

}  // namespace adaperceiver
