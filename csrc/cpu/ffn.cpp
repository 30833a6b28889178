// Matryoshka FFN on the CPU: the width-banded GEMMs of ffn_banded.cpp (oneDNN / MKL on weight
// slices, bf16 / fp16 in their dtype where the CPU has native GEMMs for it; units past a
// sample's width are never computed, but for a small batch of several widths on AMX, which
// runs one GEMM pair at the widest width), and the elementwise pass of the bf16 / fp16
// backward (gelu_backward_lowp_, column_sums).
#include "common.h"
#include "ffn_banded.h"
#include "kernels.h"
#include "cpu/microkernel.h"
#include "cpu/vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace adaperceiver {
namespace cpu {

namespace {

// ---- the elementwise passes of the low-precision backward (ffn_banded.cpp) ----
// Row sums run in fixed chunks of kSumRows rows, each chunk's column sums in float32, the
// chunks added in order: a function of the shape only (never of the thread count).
constexpr int64_t kSumRows = 64;

// One row: d = g * GELU'(x) and a = GELU(x) (exact, erf form, as at::gelu_backward and
// at::gelu compute them in float32: GELU'(x) = Phi(x) + x phi(x)); GELU(+inf) is NaN, as in
// bias_gelu_row, and GELU'(+-inf) is NaN (inf * 0), as in at::gelu_backward.
ADAPERCEIVER_CLONES
void gelu_grad_row(const float* g, const float* x, int64_t n, float* d, float* a) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float cdf = 0.5f * (1.f + erf_as(v * 0.7071067811865476f));
    const float pdf = exp_neg(-0.5f * v * v) * 0.3989422804014327f;
    d[i] = g[i] * (cdf + v * pdf);
    a[i] = v > std::numeric_limits<float>::max() ? std::numeric_limits<float>::quiet_NaN()
                                                  : v * cdf;
  }
}

ADAPERCEIVER_CLONES
void add_row(float* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

// Column sums of `rows` rows of n values in fixed chunks of kSumRows rows: per chunk (parallel
// over chunks) the float32 sum of row(r, scratch) over its rows, then the chunks' sums added in
// chunk order. row(r, scratch) returns row r as n float32 values (it may write elsewhere too);
// scratch = make_scratch(), once per thread.
template <typename Make, typename Row>
at::Tensor chunked_column_sums(int64_t rows, int64_t n, Make make_scratch, Row row) {
  const int64_t chunks = (rows + kSumRows - 1) / kSumRows;
  std::vector<float> part(chunks * n, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    auto scratch = make_scratch();
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = c * kSumRows; r < std::min(rows, (c + 1) * kSumRows); ++r)
        add_row(part.data() + c * n, row(r, scratch), n);
  });
  at::Tensor out = at::zeros({n}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t c = 0; c < chunks; ++c) add_row(o + j0, part.data() + c * n + j0, j1 - j0);
  });
  return out;
}

// dpre = gelu_backward(g, pre) and pre = GELU(pre), both rounded to T, row by row; the column
// sums of the rounded dpre.
template <typename T>
at::Tensor gelu_backward_rows(const at::Tensor& g, at::Tensor& pre, at::Tensor& dpre) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const int64_t n = g.size(1), ldd = dpre.stride(0);
  const T* gp = g.data_ptr<T>();
  T* xp = pre.data_ptr<T>();
  T* dp = dpre.data_ptr<T>();
  return chunked_column_sums(g.size(0), n, [n] { return std::vector<float>(4 * n); },
                             [&](int64_t r, std::vector<float>& buf) {
    float *gf = buf.data(), *xf = gf + n, *df = xf + n, *af = df + n;
    to_float_row(gp + r * n, n, gf);
    to_float_row(xp + r * n, n, xf);
    gelu_grad_row(gf, xf, n, df, af);
    scale_row_lowp(kBf16, df, 1.f, n, reinterpret_cast<uint16_t*>(dp + r * ldd));
    scale_row_lowp(kBf16, af, 1.f, n, reinterpret_cast<uint16_t*>(xp + r * n));
    to_float_row(dp + r * ldd, n, df);  // the sum reads the rounded dpre
    return static_cast<const float*>(df);
  });
}

template <typename T>
at::Tensor column_sums_rows(const at::Tensor& m) {
  const int64_t n = m.size(1), ld = m.stride(0);
  const T* mp = m.data_ptr<T>();
  return chunked_column_sums(m.size(0), n, [n] { return std::vector<float>(n); },
                             [&](int64_t r, std::vector<float>& buf) {
    return static_cast<const float*>(float_row(mp + r * ld, n, buf.data()));
  });
}

void check_lowp_matrix(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.device().is_cpu() && t.stride(1) == 1 &&
                  (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf),
              what, " must be a bfloat16 / float16 CPU matrix of unit column stride");
}

}  // namespace

at::Tensor gelu_backward_lowp_(const at::Tensor& g, at::Tensor& pre, at::Tensor& dpre) {
  check_lowp_matrix(g, "gelu_backward_lowp_: g");
  check_lowp_matrix(dpre, "gelu_backward_lowp_: dpre");
  TORCH_CHECK(g.is_contiguous() && pre.is_contiguous() && pre.sizes() == g.sizes() &&
                  dpre.sizes() == g.sizes() && pre.scalar_type() == g.scalar_type() &&
                  dpre.scalar_type() == g.scalar_type(),
              "gelu_backward_lowp_: g and pre contiguous, dpre, all of one shape and dtype");
  return g.scalar_type() == at::kBFloat16 ? gelu_backward_rows<c10::BFloat16>(g, pre, dpre)
                                          : gelu_backward_rows<c10::Half>(g, pre, dpre);
}

at::Tensor column_sums(const at::Tensor& m) {
  check_lowp_matrix(m, "column_sums: m");
  return m.scalar_type() == at::kBFloat16 ? column_sums_rows<c10::BFloat16>(m)
                                          : column_sums_rows<c10::Half>(m);
}

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
