// Matryoshka FFN on the CPU: the width-grouped GEMMs of ffn_grouped.cpp (MKL sgemm on weight
// prefixes fc1_weight[:h], fc2_weight[:, :h]; units past a sample's width are never computed).
#include "common.h"
#include "ffn_grouped.h"
#include "kernels.h"

namespace adaperceiver {
namespace cpu {

at::Tensor ffn_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  check_ffn_args(x, w1, b1, w2, b2, hidden);
  TORCH_CHECK(x.device().is_cpu(), "matryoshka_ffn_fwd (CPU kernel) got tensors on ", x.device());
  return ffn_fwd_grouped(x, w1, b1, w2, b2, hidden);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  TORCH_CHECK(x.device().is_cpu(), "matryoshka_ffn_bwd (CPU kernel) got tensors on ", x.device());
  return ffn_bwd_grouped(grad_out, x, w1, b1, w2, b2, hidden);
}

}  // namespace cpu
}  // namespace adaperceiver
