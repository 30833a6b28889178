// Width groups and bands of the Matryoshka FFN (shared by the CPU and CUDA paths).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace adaperceiver {

struct WidthGroup {
  int64_t h;                 // hidden width of every sample in the group
  std::vector<int64_t> idx;  // sample indices, increasing
  bool contiguous;           // idx is a run of adjacent samples (in-place views, no gather)
};

// Samples grouped by width, widest group first.
std::vector<WidthGroup> groups_by_width(at::IntArrayRef hidden);

namespace cpu {
// act (rows, h) float32 contiguous, on the CPU, bias (h,): act = GELU(act + bias) in place.
void bias_gelu_(at::Tensor& act, const at::Tensor& bias);
}  // namespace cpu

// The forward in nested width bands (ffn_grouped.cpp).
at::Tensor ffn_fwd_banded(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden);

}  // namespace adaperceiver
