// Matryoshka FFN on the CPU: the width-banded GEMMs of ffn_banded.cpp (oneDNN / MKL on weight
// slices, bf16 / fp16 in their dtype where the CPU has native GEMMs for it; units past a
// sample's width are never computed).
#include "common.h"
#include "ffn_banded.h"
#include "kernels.h"
#include "cpu/vec_math.h"

#include <ATen/Parallel.h>

namespace adaperceiver {
namespace cpu {

void bias_gelu_(at::Tensor& act, const at::Tensor& bias) {
  const int64_t rows = act.size(0), h = act.size(1);
  TORCH_CHECK(act.dim() == 2 && act.is_contiguous() && act.device().is_cpu() &&
                  act.scalar_type() == at::kFloat && bias.numel() == h &&
                  bias.scalar_type() == at::kFloat,
              "bias_gelu_: act must be a contiguous float32 CPU matrix and bias float32 of its "
              "width");
  float* a = act.data_ptr<float>();
  const at::Tensor b = bias.contiguous();
  const float* bp = b.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) bias_gelu_row(a + r * h, bp, h);
  });
}

at::Tensor ffn_fwd(ADAPERCEIVER_FFN_FWD_PARAMS) {
  check_ffn_args(x, w1, b1, w2, b2, hidden);
  TORCH_CHECK(x.device().is_cpu(), "matryoshka_ffn_fwd (CPU kernel) got tensors on ", x.device());
  return ffn_fwd_banded(x, w1, b1, w2, b2, hidden);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(
    ADAPERCEIVER_FFN_BWD_PARAMS) {
  TORCH_CHECK(x.device().is_cpu(), "matryoshka_ffn_bwd (CPU kernel) got tensors on ", x.device());
  return ffn_bwd_banded(grad_out, x, w1, b1, w2, b2, hidden);
}

}  // namespace cpu
}  // namespace adaperceiver
