// Matryoshka FFN on weight slices, written with ATen GEMMs (device-generic).
//
// Computes out[b] = fc2(GELU(fc1(x[b]))[:, :h_b]) with fc2 reading only its first h_b input
// columns, i.e. adaperceiver/ops/reference.py ffn_forward/ffn_backward without paying for the
// masked units.
// Schedule (nested bands), forward and backward: samples are put widest first (no copy when they
// already are; otherwise one gather of the inputs and one scatter of the outputs), so the samples
// that use hidden unit u are a prefix. The units are cut into bands [lo, hi) at the distinct
// widths; band [lo, hi) runs fc1 rows [lo, hi) and fc2 columns [lo, hi) on the rows of the
// samples with width >= hi, the products over the hidden units (fc2's output, dx) accumulating
// in place band after band. Every GEMM covers all the samples that need it, so a mixed batch
// runs few, tall GEMMs instead of one short one per width.
// Skipped: every hidden unit past a sample's width (never computed, gets no gradient).
// float32 runs as it is. bfloat16/float16 forward on a CPU with native GEMMs for the dtype
// (cpu::native_bf16_gemm / native_fp16_gemm: AVX512-BF16 / AMX, AVX512-FP16 / AMX-FP16) runs
// in the dtype through oneDNN, float32 accumulation inside each GEMM: fc1 with its bias and the
// exact (erf) GELU as the GEMM's post-op, fc2 in place on its column slice, one pair of GEMMs
// per distinct width (not per band) so that every output element is rounded once; no weight
// or activation is copied to float32. Otherwise (other CPUs, the backward,
// other devices) they compute in float32 and cast back.
#include "common.h"
#include "ffn_banded.h"
#include "kernels.h"
#include "cpu/microkernel.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <numeric>
#include <string>

namespace adaperceiver {

namespace {

// The samples widest first (stable) and the bands of hidden units between their widths.
struct Bands {
  std::vector<int64_t> perm;  // sample order, widest first
  bool in_order = true;       // perm is the identity: rows are read and written in place
  at::Tensor idx;             // perm as a tensor on the data's device (when !in_order)
  struct Band {
    int64_t lo, hi, n;        // hidden units [lo, hi), run by the first n samples of perm
  };
  std::vector<Band> bands;    // narrowest first: the first band covers every sample

  Bands(at::IntArrayRef hidden, const at::Device& dev) : perm(hidden.size()) {
    const int64_t B = static_cast<int64_t>(hidden.size());
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return hidden[a] > hidden[b]; });
    for (int64_t i = 0; i < B; ++i) in_order = in_order && perm[i] == i;
    if (!in_order)
      idx = host_to_device(at::tensor(perm, at::TensorOptions().dtype(at::kLong)), dev);
    int64_t lo = 0;
    for (int64_t n = B; n > 0;) {
      const int64_t hi = hidden[perm[n - 1]];
      bands.push_back({lo, hi, n});
      lo = hi;
      while (n > 0 && hidden[perm[n - 1]] <= lo) --n;
    }
  }

  // t (B, N, F) as (B * N, F) rows in perm order: a view when in order, else a gather
  at::Tensor rows(const at::Tensor& t) const {
    return (in_order ? t : t.index_select(0, idx)).reshape({-1, t.size(2)});
  }

  // where the rows of dst (B, N, F) are written in perm order: dst itself when in order, else a
  // scratch that scatter() copies back
  at::Tensor rows_out(at::Tensor& dst) const {
    const int64_t rows = dst.size(0) * dst.size(1), f = dst.size(2);
    return in_order ? dst.view({rows, f}) : at::empty({rows, f}, dst.options());
  }

  // rows (B * N, F) in perm order back into dst (B, N, F) (nothing to do when in order: the
  // rows were written in place)
  void scatter(at::Tensor& dst, const at::Tensor& rows) const {
    if (!in_order) dst.index_copy_(0, idx, rows.view(dst.sizes()));
  }
};

// oneDNN's matmul on plain weights (mkldnn::_linear_pointwise), the library the model's other
// float32 CPU projections use (adaperceiver/ops/linear.py says why: MKL takes a generic path on
// AMD CPUs); nullptr when this torch has no oneDNN or ADAPERCEIVER_CPU_GEMM=mkl.
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    // read as ops/linear.py reads it (surrounding blanks and case ignored), so the FFN and the
    // projections always agree on the library; ops/linear.py rejects other values at import
    std::string env;
    if (const char* v = std::getenv("ADAPERCEIVER_CPU_GEMM")) env = v;
    env.erase(0, env.find_first_not_of(" \t\n\r"));
    env.erase(env.find_last_not_of(" \t\n\r") + 1);
    std::transform(env.begin(), env.end(), env.begin(),
                   [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    if (env == "mkl") return std::nullopt;
    if (!at::hasMKLDNN()) return std::nullopt;
    return c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  }();
  return op ? &*op : nullptr;
}

// Rows from which a column slice of a weight (fc2's band [lo, hi): rows of stride H) is copied
// to a contiguous block for oneDNN rather than multiplied in place by MKL. oneDNN would run the
// strided slice on its reference GEMM (orders of magnitude slower). From a few hundred rows the
// copy pays for itself in the faster GEMM; for small products the copy costs about what it
// saves, so they keep MKL on the slice in place (figures: benchmarks/README.md).
constexpr int64_t kCopySliceMinRows = 64;

// x (rows, k) times w (n, k) transposed, plus bias when given: a new (rows, n) float32 tensor.
// On the CPU through oneDNN when available (a strided column slice of w made contiguous first
// when x has enough rows, see above), else ATen's GEMM (MKL on the CPU).
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, const OptT& bias) {
  if (x.device().is_cpu() && (w.is_contiguous() || x.size(0) >= kCopySliceMinRows)) {
    if (const c10::OperatorHandle* op = onednn_linear_op()) {
      torch::jit::Stack stack{x, w.contiguous(), bias, std::string("none"),
                              c10::List<std::optional<at::Scalar>>(), std::string("")};
      op->callBoxed(stack);
      return stack[0].toTensor();
    }
  }
  return bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

// fc1 of one band in the low-precision dtype on the CPU: GELU(x w^T + bias) through oneDNN
// with the bias and the exact GELU as post-ops (one rounding of the float32 result), or ATen's
// addmm and gelu when oneDNN is not there.
at::Tensor fc1_gelu_low_precision(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (const c10::OperatorHandle* op = onednn_linear_op()) {
    torch::jit::Stack stack{x, w.contiguous(), b, std::string("gelu"),
                            c10::List<std::optional<at::Scalar>>(), std::string("none")};
    op->callBoxed(stack);
    return stack[0].toTensor();
  }
  return at::gelu(at::addmm(b, x, w.t()));
}

// True when x's dtype runs natively on this CPU (see the file's comment).
bool native_low_precision(const at::Tensor& x) {
  if (!x.device().is_cpu()) return false;
  if (x.scalar_type() == at::kBFloat16) return cpu::native_bf16_gemm();
  if (x.scalar_type() == at::kHalf) return cpu::native_fp16_gemm();
  return false;
}

// The forward in x's low-precision dtype (native_low_precision(x)).
at::Tensor ffn_fwd_low_precision(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& b2,
                                 at::IntArrayRef hidden) {
  const int64_t B = x.size(0), N = x.size(1), Cout = w2.size(0);
  if (B * N * Cout == 0) return at::empty({B, N, Cout}, x.options());
  const Bands bands(hidden, x.device());
  const at::Tensor xs = bands.rows(x.contiguous());
  at::Tensor out = at::empty({B, N, Cout}, x.options());
  at::Tensor os = bands.rows_out(out);
  // One pair of GEMMs per distinct width (its samples' rows are contiguous in perm order), not
  // per band: each output element is then one GEMM's float32 sum rounded once, as in the
  // reference, where per-band accumulation in the dtype would round once per band (more than
  // the accuracy rule's 2x the reference's error in float16). Same FLOPs as the bands; fewer
  // rows per GEMM.
  for (size_t i = 0; i < bands.bands.size(); ++i) {
    const int64_t n_next = i + 1 < bands.bands.size() ? bands.bands[i + 1].n : 0;
    const int64_t r0 = n_next * N, rows = (bands.bands[i].n - n_next) * N;
    const int64_t h = bands.bands[i].hi;  // the width of samples [n_next, n) in perm order
    const at::Tensor act = fc1_gelu_low_precision(xs.narrow(0, r0, rows), w1.narrow(0, 0, h),
                                                  b1.narrow(0, 0, h));
    // fc2 on its column slice in place (a BLAS-style leading dimension, which the bf16 GEMM
    // takes as it is), bias included
    at::Tensor dst = os.narrow(0, r0, rows);
    at::addmm_out(dst, b2, act, w2.narrow(1, 0, h).t());
  }
  bands.scatter(out, os);
  return out;
}

}  // namespace

at::Tensor ffn_fwd_banded(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  if (native_low_precision(x)) return ffn_fwd_low_precision(x, w1, b1, w2, b2, hidden);
  const auto wt = at::kFloat;  // check_ffn_args admits float32, bfloat16 and float16
  at::Tensor xw = x.to(wt).contiguous(), w1w = w1.to(wt), b1w = b1.to(wt), w2w = w2.to(wt),
             b2w = b2.to(wt);
  const int64_t B = x.size(0), N = x.size(1), Cout = w2.size(0);
  if (B * N * Cout == 0) return at::empty({B, N, Cout}, x.options());
  const Bands bands(hidden, x.device());
  const at::Tensor xs = bands.rows(xw);
  // fc2's output rows in perm order: the first band's product (that band covers every row and
  // brings fc2's bias), later bands' products added in place; no separate output to copy into
  at::Tensor os;
  // fc1's bias joins the GELU pass on the CPU (cpu/ffn.cpp) rather than being added to the
  // GEMM's output first; elsewhere it is the GEMM's beta term
  const bool cpu = xw.device().is_cpu();
  for (const auto& band : bands.bands) {
    const int64_t rows = band.n * N, u = band.hi - band.lo;
    const at::Tensor xr = xs.narrow(0, 0, rows);
    const at::Tensor w1b = w1w.narrow(0, band.lo, u), w2b = w2w.narrow(1, band.lo, u);
    at::Tensor act = dense_linear(xr, w1b, cpu ? OptT() : OptT(b1w.narrow(0, band.lo, u)));
    if (cpu) {
      cpu::bias_gelu_(act, b1w.narrow(0, band.lo, u));
    } else {
      at::gelu_(act);
    }
    at::Tensor y = dense_linear(act, w2b, band.lo == 0 ? OptT(b2w) : OptT());
    if (band.lo == 0) {
      os = std::move(y);
    } else {
      os.narrow(0, 0, rows).add_(y);
    }
  }
  if (bands.in_order) return os.view({B, N, Cout}).to(x.scalar_type());
  at::Tensor out = at::empty({B, N, Cout}, os.options());
  bands.scatter(out, os);
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_banded(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  check_ffn_args(x, w1, b1, w2, b2, hidden);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Cout = w2.size(0);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, N, Cout}), "grad_out must be (", B, ", ",
              N, ", ", Cout, "); got ", shape_str(grad_out));
  const auto wt = at::kFloat;
  at::Tensor xw = x.to(wt).contiguous(), go = grad_out.to(wt).contiguous();
  at::Tensor w1w = w1.to(wt), b1w = b1.to(wt), w2w = w2.to(wt);
  at::Tensor dx = at::empty({B, N, C}, xw.options());
  at::Tensor dw1 = at::zeros(w1.sizes(), xw.options()), db1 = at::zeros(b1.sizes(), xw.options());
  at::Tensor dw2 = at::zeros(w2.sizes(), xw.options());
  at::Tensor db2 = go.reshape({-1, Cout}).sum(0);
  if (B * N > 0) {
    const Bands bands(hidden, x.device());
    const at::Tensor xs = bands.rows(xw), gs = bands.rows(go);
    at::Tensor dxs = bands.rows_out(dx);
    for (const auto& band : bands.bands) {
      const int64_t rows = band.n * N, u = band.hi - band.lo;
      const at::Tensor xr = xs.narrow(0, 0, rows), gr = gs.narrow(0, 0, rows);
      const at::Tensor w1b = w1w.narrow(0, band.lo, u), w2b = w2w.narrow(1, band.lo, u);
      const at::Tensor pre = at::addmm(b1w.narrow(0, band.lo, u), xr, w1b.t());
      const at::Tensor dpre = at::gelu_backward(at::mm(gr, w2b), pre);
      if (band.lo == 0) {
        at::mm_out(dxs, dpre, w1b);  // every row
      } else {
        dxs.narrow(0, 0, rows).addmm_(dpre, w1b);
      }
      // each band owns its slice of the weight gradients
      at::Tensor dw1b = dw1.narrow(0, band.lo, u), dw2b = dw2.narrow(1, band.lo, u);
      at::mm_out(dw1b, dpre.t(), xr);
      db1.narrow(0, band.lo, u).copy_(dpre.sum(0));
      at::mm_out(dw2b, gr.t(), at::gelu(pre));
    }
    bands.scatter(dx, dxs);
  } else {
    dx.zero_();
  }
  return {dx.to(x.scalar_type()), dw1.to(w1.scalar_type()), db1.to(b1.scalar_type()),
          dw2.to(w2.scalar_type()), db2.to(b2.scalar_type())};
}

}  // namespace adaperceiver
