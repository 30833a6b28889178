// The block's residual with LayerScale and the LayerNorm after it, on the CPU, in one pass over
// the rows (adaperceiver/ops/norm.py says when it runs).
//
// residual_layer_norm(x, branch, gamma, weight, bias, eps, normalize): per row of C values,
//   r = x + gamma * branch  (when branch is given: torch.addcmul(x, branch, gamma), one fused
//                            multiply-add in float32 and one rounding to the dtype, bit for bit
//                            what addcmul gives)
//   n = (r - mean(r)) / sqrt(var(r) + eps) * weight + bias  (when normalize: F.layer_norm of the
//                            rounded r, moments in float32 by two passes, one rounding)
// and returns (r, n): r empty (0 values) without a branch (r is x), n empty without normalize;
// x is bfloat16 or float16 with a branch of its dtype, or float32 with a bfloat16, float16 or
// float32 branch (autocast's residual stream: float32, its branches in the autocast dtype); r is
// x's dtype, n norm_dtype's (default x's; a float32 x also takes bfloat16 or float16: the norm
// rounded once to it from float32, which is what casting the float32 norm gives, for a norm
// whose result only feeds matmuls under autocast, so no float32 copy is written and cast).
// Why: torch runs the residual and the norm as two passes over the (rows x C) activations
// (addcmul then layer_norm), each reading and writing them once more; its 16-bit paths of both
// run well below memory speed, and a 16-bit branch added to a float32 x costs addcmul a
// conversion pass of its own first; here each row is read once, kept in a float32 scratch of
// the thread, and both results written from it.
// Schedule: rows in blocks of about 16K values per at::parallel_for task. Per row, on AVX-512
// (with BW, VL and, for a bfloat16 x, AVX512-BF16; best_isa() is AVX-512): one pass reads x (and
// the branch), writes r and keeps it in float32 in an L1 scratch while summing it, a second
// sums the squared deviations, a third writes the norm; 16 values a step, four accumulators
// per sum (so the add chains do not bound the loops), masked tails. Elsewhere (no AVX-512, or
// no AVX512-BF16 for a bfloat16 x) the op is torch's at::addcmul and at::layer_norm: plain loops
// with scalar 16-bit rounding ran fp16 slower than those there.
// Skipped: nothing; NaN and inf go through the arithmetic as in torch (a non-finite value makes
// its own row's moments, and so that row's normalized values, NaN).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"
#include "kernels.h"
#include "cpu/microkernel.h"

#include <immintrin.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace adaperceiver {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define ADAPERCEIVER_NORM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// 16 values of T from p (lanes of k; the others 0) as float32
template <typename T>
ADAPERCEIVER_NORM_AVX512 inline __m512 load16(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// v rounded to T (round to nearest even; float32: as it is) and stored to p (lanes of k);
// returns the rounded values as float32
template <typename T>
ADAPERCEIVER_NORM_AVX512 inline __m512 store16(T* p, __mmask16 k, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, k, v);
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_mask_storeu_epi16(p, k, h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(p, k, h);
    return _mm512_cvtph_ps(h);
  }
}

// Pass 1's step: values [j, j + 16) (lanes of k) of r = x + g * br rounded to T and stored to
// ro (br given, of type TB; else r = x), kept as float32 in buf, returned (lanes past k: 0)
template <typename T, typename TB>
ADAPERCEIVER_NORM_AVX512 inline __m512 residual16(const T* x, const TB* br, const float* g, T* ro,
                                                  float* buf, int64_t j, __mmask16 k) {
  __m512 v = load16(x + j, k);
  if (br) v = store16(ro + j, k, _mm512_fmadd_ps(load16(br + j, k), load16(g + j, k), v));
  _mm512_storeu_ps(buf + j, v);
  return v;
}

// Pass 2's step: (buf[j..j+16) - mean)^2 (lanes past k: 0)
ADAPERCEIVER_NORM_AVX512 inline __m512 dev2_16(const float* buf, __m512 mean, int64_t j,
                                               __mmask16 k) {
  const __m512 d = _mm512_maskz_sub_ps(k, _mm512_loadu_ps(buf + j), mean);
  return _mm512_mul_ps(d, d);
}

ADAPERCEIVER_NORM_AVX512 inline float sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

// One row (see the file's comment); buf holds round_up(C, 16) floats.
template <typename T, typename TB, typename TN>
ADAPERCEIVER_NORM_AVX512 void row_avx512(const T* x, const TB* br, const float* g, const float* w,
                                         const float* b, int64_t C, float eps, T* ro, TN* no,
                                         float* buf) {
  constexpr __mmask16 kAll = 0xFFFF;
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t j = 0;
  for (; j + 64 <= C; j += 64) {  // pass 1: r into buf (and ro), and its sum
    s0 = _mm512_add_ps(s0, residual16(x, br, g, ro, buf, j, kAll));
    s1 = _mm512_add_ps(s1, residual16(x, br, g, ro, buf, j + 16, kAll));
    s2 = _mm512_add_ps(s2, residual16(x, br, g, ro, buf, j + 32, kAll));
    s3 = _mm512_add_ps(s3, residual16(x, br, g, ro, buf, j + 48, kAll));
  }
  for (; j < C; j += 16) s0 = _mm512_add_ps(s0, residual16(x, br, g, ro, buf, j, lanes_below(C, j)));
  if (!no) return;
  const __m512 vm = _mm512_set1_ps(sum4(s0, s1, s2, s3) / static_cast<float>(C));
  s0 = s1 = s2 = s3 = _mm512_setzero_ps();
  for (j = 0; j + 64 <= C; j += 64) {  // pass 2: the squared deviations
    s0 = _mm512_add_ps(s0, dev2_16(buf, vm, j, kAll));
    s1 = _mm512_add_ps(s1, dev2_16(buf, vm, j + 16, kAll));
    s2 = _mm512_add_ps(s2, dev2_16(buf, vm, j + 32, kAll));
    s3 = _mm512_add_ps(s3, dev2_16(buf, vm, j + 48, kAll));
  }
  for (; j < C; j += 16) s0 = _mm512_add_ps(s0, dev2_16(buf, vm, j, lanes_below(C, j)));
  const float var = sum4(s0, s1, s2, s3) / static_cast<float>(C);
  const __m512 vr = _mm512_set1_ps(1.f / std::sqrt(var + eps));
  for (j = 0; j < C; j += 16) {  // pass 3: (r - mean) * rstd * w + b, rounded
    const __mmask16 k = lanes_below(C, j);
    __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + j), vm), vr);
    if (w) {
      y = _mm512_fmadd_ps(y, _mm512_maskz_loadu_ps(k, w + j), _mm512_maskz_loadu_ps(k, b + j));
    }
    store16(no + j, k, y);
  }
}

// Whether the AVX-512 rows run for x of dtype st and a norm of dtype nt (AVX512-BF16 to round
// to bfloat16; a bfloat16 branch is only widened, which needs nothing more)
bool avx512_rows(at::ScalarType st, at::ScalarType nt) {
  static const bool base = best_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl");
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  return base && ((st != at::kBFloat16 && nt != at::kBFloat16) || bf16);
}

// A (C,) parameter (x's dtype, any stride) as float32 (empty when not given): widened in a
// plain loop, exactly as Tensor.to(float32) widens it, with no ATen op (the kernel takes up to
// three per call, the model six calls per layer)
template <typename T>
void widen(const at::Tensor& t, std::vector<float>& out) {
  const T* p = t.data_ptr<T>();
  const int64_t s = t.stride(0);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(p[int64_t(i) * s]);
}

std::vector<float> as_floats(const OptT& t) {
  if (!t.has_value() || !t->defined()) return {};
  std::vector<float> out(t->numel());
  switch (t->scalar_type()) {
    case at::kFloat: widen<float>(*t, out); break;
    case at::kBFloat16: widen<c10::BFloat16>(*t, out); break;
    case at::kHalf: widen<c10::Half>(*t, out); break;
    default: TORCH_CHECK(false, "residual_layer_norm: a (C,) parameter of ", t->scalar_type());
  }
  return out;
}

template <typename T, typename TB, typename TN>
void run_rows(const at::Tensor& x, const OptT& branch, const std::vector<float>& g,
              const std::vector<float>& w, const std::vector<float>& b, float eps,
              at::Tensor& r_out, at::Tensor& n_out) {
  const int64_t C = x.size(-1), R = x.numel() / std::max<int64_t>(C, 1);
  const T* xp = x.data_ptr<T>();
  const TB* bp = branch ? branch->data_ptr<TB>() : nullptr;
  T* rp = r_out.defined() ? r_out.data_ptr<T>() : nullptr;
  TN* np = n_out.defined() ? n_out.data_ptr<TN>() : nullptr;
  const float* wp = w.empty() ? nullptr : w.data();
  const float* biasp = b.empty() ? nullptr : b.data();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf((C + 15) / 16 * 16);
    for (int64_t r = r0; r < r1; ++r) {
      row_avx512<T, TB, TN>(xp + r * C, bp ? bp + r * C : nullptr, g.data(), wp, biasp, C, eps,
                        rp ? rp + r * C : nullptr, np ? np + r * C : nullptr, buf.data());
    }
  });
}

// run_rows with the norm in nt: x's dtype, or bfloat16 / float16 for a float32 x (checked)
template <typename T, typename TB>
void run_rows_to(at::ScalarType nt, const at::Tensor& x, const OptT& branch,
                 const std::vector<float>& g, const std::vector<float>& w,
                 const std::vector<float>& b, float eps, at::Tensor& r_out, at::Tensor& n_out) {
  if constexpr (std::is_same_v<T, float>) {
    if (nt == at::kBFloat16) {
      return run_rows<T, TB, c10::BFloat16>(x, branch, g, w, b, eps, r_out, n_out);
    }
    if (nt == at::kHalf) return run_rows<T, TB, c10::Half>(x, branch, g, w, b, eps, r_out, n_out);
  }
  run_rows<T, TB, T>(x, branch, g, w, b, eps, r_out, n_out);
}
#else
bool avx512_rows(at::ScalarType, at::ScalarType) { return false; }
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> residual_layer_norm(const at::Tensor& x, const OptT& branch,
                                                       const OptT& gamma, const OptT& weight,
                                                       const OptT& bias, double eps,
                                                       bool normalize,
                                                       std::optional<at::ScalarType> norm_dtype) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kBFloat16 || st == at::kHalf || st == at::kFloat,
              "residual_layer_norm: x must be bfloat16, float16 or float32, got ", st);
  const auto nt = norm_dtype.value_or(st);
  TORCH_CHECK(nt == st || (st == at::kFloat && (nt == at::kBFloat16 || nt == at::kHalf)),
              "residual_layer_norm: norm_dtype must be x's dtype (", st, ") or, for a float32 x, "
              "bfloat16 or float16; got ", nt);
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
    const auto bt = branch->scalar_type();
    TORCH_CHECK(branch->sizes() == x.sizes() && branch->device().is_cpu() &&
                    (bt == st || (st == at::kFloat && (bt == at::kBFloat16 || bt == at::kHalf))),
                "residual_layer_norm: branch must match x (", x.sizes(), " ", st,
                " on the CPU; a float32 x also takes a bfloat16 or float16 branch), got ",
                branch->sizes(), " ", bt, " on ", branch->device());
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
  if (!avx512_rows(st, nt)) {  // torch's ops (see the file's comment)
    const at::Tensor none = at::empty({0}, x.options());
    const at::Tensor r = has_branch ? at::addcmul(x, *branch, *gamma) : x;
    const at::Tensor n = normalize ? at::layer_norm(r, {C}, weight, bias, eps).to(nt) : none;
    return {has_branch ? r : none, n};
  }
  const at::Tensor xc = x.contiguous();
  const OptT bc = has_branch ? OptT(branch->contiguous()) : OptT();
  at::Tensor r_out = has_branch ? at::empty_like(xc) : at::Tensor();
  at::Tensor n_out = normalize ? at::empty_like(xc, xc.options().dtype(nt)) : at::Tensor();
  auto results = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    const at::Tensor none = at::empty({0}, xc.options());
    return {r_out.defined() ? r_out : none, n_out.defined() ? n_out : none};
  };
  if (xc.numel() == 0) return results();
  const std::vector<float> g = has_branch ? as_floats(gamma) : std::vector<float>();
  const std::vector<float> w = as_floats(weight), b = as_floats(bias);
  const float e = static_cast<float>(eps);
#if defined(__x86_64__) && defined(__GNUC__)
  const auto bt = has_branch ? branch->scalar_type() : st;
  if (st == at::kBFloat16) {
    run_rows<c10::BFloat16, c10::BFloat16, c10::BFloat16>(xc, bc, g, w, b, e, r_out, n_out);
  } else if (st == at::kHalf) {
    run_rows<c10::Half, c10::Half, c10::Half>(xc, bc, g, w, b, e, r_out, n_out);
  } else if (bt == at::kBFloat16) {
    run_rows_to<float, c10::BFloat16>(nt, xc, bc, g, w, b, e, r_out, n_out);
  } else if (bt == at::kHalf) {
    run_rows_to<float, c10::Half>(nt, xc, bc, g, w, b, e, r_out, n_out);
  } else {
    run_rows_to<float, float>(nt, xc, bc, g, w, b, e, r_out, n_out);
  }
#endif
  return results();
}

}  // namespace cpu
}  // namespace adaperceiver
