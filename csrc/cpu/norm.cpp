// The block's residual with LayerScale and the LayerNorm after it, on the CPU, in one pass over
// the rows (adaperceiver/ops/norm.py says when it runs).
//
// residual_layer_norm(x, branch, gamma, weight, bias, eps, normalize): per row of C values,
//   r = x + gamma * branch  (when branch is given: torch.addcmul(x, branch, gamma), one fused
//                            multiply-add in float32 and one rounding to the dtype, bit for bit
//                            what addcmul gives in float32, bfloat16 and float16)
//   n = (r - mean(r)) / sqrt(var(r) + eps) * weight + bias  (when normalize: F.layer_norm of the
//                            rounded r, moments in float32 by two passes, one rounding)
// and returns (r, n): r empty (0 values) without a branch (r is x), n empty without normalize.
// Why: torch runs the residual and the norm as two passes over the (rows x C) activations
// (addcmul then layer_norm), each reading and writing them once more, and its bfloat16 paths
// of both run far below memory speed; here each row is read once, kept in a float32 scratch
// of the thread, and both results written from it.
// Schedule: rows in blocks of about 16K values per at::parallel_for task; per row three short
// loops (vec_math.h: built for AVX-512, AVX2 and baseline x86-64) and the 16-bit rounding of
// scale_row_lowp (AVX-512 where the CPU has AVX512-BF16, c10's rounding elsewhere).
// Skipped: nothing; NaN and inf go through the arithmetic as in torch (a non-finite value makes
// its own row's moments, and so that row's normalized values, NaN).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"
#include "kernels.h"
#include "cpu/microkernel.h"
#include "cpu/vec_math.h"

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace adaperceiver {
namespace cpu {
namespace {

// dst = x + b * g, one rounding per value (the fused multiply-add addcmul computes)
ADAPERCEIVER_CLONES
inline void fma_row(const float* x, const float* b, const float* g, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = std::fma(b[i], g[i], x[i]);
}

// sum of x (16 lane accumulators, so the order is fixed whatever the clone)
ADAPERCEIVER_CLONES
inline float row_sum(const float* x, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j];
  float sum = 0.f;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  for (; i < n; ++i) sum += x[i];
  return sum;
}

// sum of (x - m)^2
ADAPERCEIVER_CLONES
inline float row_sq_dev(const float* x, float m, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += (x[i + j] - m) * (x[i + j] - m);
  float sum = 0.f;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  for (; i < n; ++i) sum += (x[i] - m) * (x[i] - m);
  return sum;
}

// dst = (x - m) * rstd * w + b (w, b null: no affine part)
ADAPERCEIVER_CLONES
inline void norm_row(const float* x, float m, float rstd, const float* w, const float* b,
                     int64_t n, float* dst) {
  if (w == nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = (x[i] - m) * rstd;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = (x[i] - m) * rstd * w[i] + b[i];
  }
}

// float32 row src rounded to T into dst (n values); when back is given, the rounded values as
// float32 into it (back may be src)
template <typename T>
inline void round_row(const float* src, int64_t n, T* dst, float* back) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
    if (back && back != src) std::copy(src, src + n, back);
  } else {
    scale_row_lowp(std::is_same_v<T, c10::BFloat16>, src, 1.f, n,
                   reinterpret_cast<uint16_t*>(dst));
    if (back) to_float_row(dst, n, back);
  }
}

// A (C,) parameter as float32 (empty when not given)
std::vector<float> as_floats(const OptT& t) {
  if (!t.has_value() || !t->defined()) return {};
  const at::Tensor f = t->to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

template <typename T>
void run_rows(const at::Tensor& x, const OptT& branch, const std::vector<float>& g,
              const std::vector<float>& w, const std::vector<float>& b, float eps,
              at::Tensor& r_out, at::Tensor& n_out) {
  const int64_t C = x.size(-1), R = x.numel() / std::max<int64_t>(C, 1);
  const T* xp = x.data_ptr<T>();
  const T* bp = branch ? branch->data_ptr<T>() : nullptr;
  T* rp = r_out.defined() ? r_out.data_ptr<T>() : nullptr;
  T* np = n_out.defined() ? n_out.data_ptr<T>() : nullptr;
  const float* wp = w.empty() ? nullptr : w.data();
  const float* biasp = b.empty() ? nullptr : b.data();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(C), buf2(C);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = float_row(xp + r * C, C, buf.data());
      if (bp) {  // r = x + gamma * branch, rounded to T (and kept as rounded in buf)
        fma_row(row, float_row(bp + r * C, C, buf2.data()), g.data(), C, buf.data());
        round_row(buf.data(), C, rp + r * C, np ? buf.data() : nullptr);
        row = buf.data();
      }
      if (np) {
        const float mean = row_sum(row, C) / static_cast<float>(C);
        const float var = row_sq_dev(row, mean, C) / static_cast<float>(C);
        const float rstd = 1.f / std::sqrt(var + eps);
        norm_row(row, mean, rstd, wp, biasp, C, buf2.data());
        round_row(buf2.data(), C, np + r * C, static_cast<float*>(nullptr));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> residual_layer_norm(const at::Tensor& x, const OptT& branch,
                                                       const OptT& gamma, const OptT& weight,
                                                       const OptT& bias, double eps,
                                                       bool normalize) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "residual_layer_norm: x must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(x.device().is_cpu(), "residual_layer_norm: x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, "residual_layer_norm: x must have a last dimension (C)");
  const int64_t C = x.size(-1);
  const bool has_branch = branch.has_value() && branch->defined();
  TORCH_CHECK(has_branch || normalize, "residual_layer_norm: nothing to compute (no branch and "
              "normalize=False)");
  auto check_vec = [&](const OptT& t, const char* name) {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == st &&
                    t->device().is_cpu(),
                "residual_layer_norm: ", name, " must be a (", C, ",) ", st,
                " CPU tensor like x's last dimension, got ", t->sizes(), " ", t->scalar_type(),
                " on ", t->device());
  };
  if (has_branch) {
    TORCH_CHECK(branch->sizes() == x.sizes() && branch->scalar_type() == st &&
                    branch->device().is_cpu(),
                "residual_layer_norm: branch must match x (", x.sizes(), " ", st,
                " on the CPU), got ", branch->sizes(), " ", branch->scalar_type(), " on ",
                branch->device());
    TORCH_CHECK(gamma.has_value() && gamma->defined(),
                "residual_layer_norm: gamma (the LayerScale) is required with a branch");
    check_vec(gamma, "gamma");
  }
  const bool affine = weight.has_value() && weight->defined();
  TORCH_CHECK(affine == (bias.has_value() && bias->defined()),
              "residual_layer_norm: weight and bias must be given together");
  check_vec(weight, "weight");
  check_vec(bias, "bias");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "residual_layer_norm: eps must be finite and >= 0, got ",
              eps);
  const at::Tensor xc = x.contiguous();
  const OptT bc = has_branch ? OptT(branch->contiguous()) : OptT();
  at::Tensor r_out = has_branch ? at::empty_like(xc) : at::Tensor();
  at::Tensor n_out = normalize ? at::empty_like(xc) : at::Tensor();
  auto results = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    const at::Tensor none = at::empty({0}, xc.options());
    return {r_out.defined() ? r_out : none, n_out.defined() ? n_out : none};
  };
  if (xc.numel() == 0) return results();
  const std::vector<float> g = has_branch ? as_floats(gamma) : std::vector<float>();
  const std::vector<float> w = as_floats(weight), b = as_floats(bias);
  const float e = static_cast<float>(eps);
  switch (st) {
    case at::kFloat: run_rows<float>(xc, bc, g, w, b, e, r_out, n_out); break;
    case at::kBFloat16: run_rows<c10::BFloat16>(xc, bc, g, w, b, e, r_out, n_out); break;
    default: run_rows<c10::Half>(xc, bc, g, w, b, e, r_out, n_out); break;
  }
  return results();
}

}  // namespace cpu
}  // namespace adaperceiver
