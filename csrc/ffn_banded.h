// The Matryoshka FFN in nested width bands, written with ATen GEMMs (device-generic: the CPU
// backend runs both directions through it, the CUDA build its backward).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace adaperceiver {

namespace cpu {
// act (rows, h) float32 contiguous, on the CPU, bias (h,): act = GELU(act + bias) in place.
void bias_gelu_(at::Tensor& act, const at::Tensor& bias);
}  // namespace cpu

at::Tensor ffn_fwd_banded(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_banded(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden);

}  // namespace adaperceiver
