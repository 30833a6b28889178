// Matryoshka FFN on weight prefixes, written with ATen GEMMs (device-generic).
//
// Computes out[b] = fc2(GELU(fc1(x[b]))[:, :h_b]) with fc2 reading only its first h_b input
// columns, i.e. adaperceiver/ops/reference.py ffn_forward/ffn_backward without paying for the
// masked units.
// Forward schedule (nested bands): samples are put widest first (no copy when they already are;
// otherwise one gather of x and one scatter of out), so the samples that use hidden unit u are a
// prefix. The units are cut into bands [lo, hi) at the distinct widths; band [lo, hi) runs fc1
// rows [lo, hi) and fc2 columns [lo, hi) on the rows of the samples with width >= hi, fc2
// accumulating into the output in place. Every GEMM covers all the samples that need it, so a
// mixed batch runs few, tall GEMMs instead of one short one per width.
// Backward schedule: samples grouped by width (widest first); each group runs its GEMMs on the
// prefixes fc1_weight[:h] and fc2_weight[:, :h], in place when its samples are adjacent.
// Skipped: every hidden unit past a sample's width (never computed, gets no gradient).
// float32 and float64 run as they are; bfloat16/float16 compute in float32 and cast back.
#include "common.h"
#include "ffn_grouped.h"
#include "kernels.h"

#include <algorithm>
#include <map>
#include <numeric>

namespace adaperceiver {

std::vector<WidthGroup> groups_by_width(at::IntArrayRef hidden) {
  std::map<int64_t, std::vector<int64_t>, std::greater<int64_t>> by;
  for (int64_t b = 0; b < static_cast<int64_t>(hidden.size()); ++b) by[hidden[b]].push_back(b);
  std::vector<WidthGroup> out;
  for (auto& kv : by) {
    WidthGroup g;
    g.h = kv.first;
    g.idx = std::move(kv.second);
    g.contiguous = g.idx.back() - g.idx.front() + 1 == static_cast<int64_t>(g.idx.size());
    out.push_back(std::move(g));
  }
  return out;
}

namespace {

at::Tensor index_tensor(const WidthGroup& g, const at::Device& dev) {
  return at::tensor(g.idx, at::TensorOptions().dtype(at::kLong)).to(dev);
}

// The group's rows of t (B, N, C) as a (n * N, C) matrix: a view when the samples are adjacent.
at::Tensor rows_of(const at::Tensor& t, const WidthGroup& g, const at::Tensor& idx) {
  const int64_t n = static_cast<int64_t>(g.idx.size());
  if (g.contiguous) return t.narrow(0, g.idx.front(), n).reshape({-1, t.size(2)});
  return t.index_select(0, idx).reshape({-1, t.size(2)});
}

at::ScalarType work_type(at::ScalarType t) {
  return (t == at::kFloat || t == at::kDouble) ? t : at::kFloat;
}

}  // namespace

at::Tensor ffn_fwd_banded(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  const auto wt = work_type(x.scalar_type());
  at::Tensor xw = x.to(wt).contiguous(), w1w = w1.to(wt), b1w = b1.to(wt), w2w = w2.to(wt),
             b2w = b2.to(wt);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Cout = w2.size(0);
  at::Tensor out = at::empty({B, N, Cout}, xw.options());
  if (out.numel() == 0) return out.to(x.scalar_type());
  // samples widest first (stable): the samples that use hidden unit u are then a prefix
  std::vector<int64_t> perm(B);
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(),
                   [&](int64_t a, int64_t b) { return hidden[a] > hidden[b]; });
  bool in_order = true;
  for (int64_t i = 0; i < B; ++i) in_order = in_order && perm[i] == i;
  at::Tensor pidx;
  if (!in_order) pidx = at::tensor(perm, at::TensorOptions().dtype(at::kLong)).to(x.device());
  const at::Tensor xs = (in_order ? xw : xw.index_select(0, pidx)).view({B * N, C});
  at::Tensor os = in_order ? out.view({B * N, Cout}) : at::empty({B * N, Cout}, xw.options());
  // one activation buffer for all bands (fresh allocations fault in new pages every call)
  at::Tensor act_buf = at::empty({B * N * hidden[perm[0]]}, xw.options());
  // on the CPU in float32, fc1's bias joins the GELU pass (cpu/ffn.cpp) rather than being
  // copied into the GEMM's output first
  const bool cpu_bias_gelu = xw.device().is_cpu() && wt == at::kFloat;
  // bands of hidden units [lo, hi) between consecutive widths, narrowest first; band [lo, hi)
  // runs on the rows of the n samples with width >= hi (a prefix of xs)
  int64_t lo = 0;
  for (int64_t n = B; n > 0;) {
    const int64_t hi = hidden[perm[n - 1]], rows = n * N, u = hi - lo;
    at::Tensor act = act_buf.narrow(0, 0, rows * u).view({rows, u});
    const at::Tensor xr = xs.narrow(0, 0, rows);
    if (cpu_bias_gelu) {
      at::mm_out(act, xr, w1w.narrow(0, lo, u).t());
      cpu::bias_gelu_(act, b1w.narrow(0, lo, u));
    } else {
      at::addmm_out(act, b1w.narrow(0, lo, u), xr, w1w.narrow(0, lo, u).t());
      at::gelu_(act);
    }
    if (lo == 0) {
      at::addmm_out(os, b2w, act, w2w.narrow(1, lo, u).t());  // every row: fc2's bias here
    } else {
      os.narrow(0, 0, rows).addmm_(act, w2w.narrow(1, lo, u).t());
    }
    lo = hi;
    while (n > 0 && hidden[perm[n - 1]] <= lo) --n;
  }
  if (!in_order) out.index_copy_(0, pidx, os.view({B, N, Cout}));
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_grouped(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  check_ffn_args(x, w1, b1, w2, b2, hidden);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Cout = w2.size(0);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, N, Cout}), "grad_out must be (", B, ", ",
              N, ", ", Cout, "); got ", shape_str(grad_out));
  const auto wt = work_type(x.scalar_type());
  at::Tensor xw = x.to(wt).contiguous(), go = grad_out.to(wt).contiguous();
  at::Tensor w1w = w1.to(wt), b1w = b1.to(wt), w2w = w2.to(wt);
  at::Tensor dx = at::empty({B, N, C}, xw.options());
  at::Tensor dw1 = at::zeros(w1.sizes(), xw.options()), db1 = at::zeros(b1.sizes(), xw.options());
  at::Tensor dw2 = at::zeros(w2.sizes(), xw.options());
  at::Tensor db2 = go.reshape({-1, Cout}).sum(0);
  if (B * N > 0) {
    for (const auto& g : groups_by_width(hidden)) {
      const at::Tensor idx = g.contiguous ? at::Tensor() : index_tensor(g, x.device());
      at::Tensor xg = rows_of(xw, g, idx), gg = rows_of(go, g, idx);
      const at::Tensor w1h = w1w.narrow(0, 0, g.h), w2h = w2w.narrow(1, 0, g.h);
      at::Tensor pre = at::addmm(b1w.narrow(0, 0, g.h), xg, w1h.t());
      at::Tensor dpre = at::gelu_backward(at::mm(gg, w2h), pre);
      at::Tensor act = at::gelu(pre);
      if (g.contiguous) {
        at::Tensor dst = dx.narrow(0, g.idx.front(), static_cast<int64_t>(g.idx.size()))
                             .view({-1, C});
        at::mm_out(dst, dpre, w1h);
      } else {
        dx.index_copy_(0, idx, at::mm(dpre, w1h).view({-1, N, C}));
      }
      dw1.narrow(0, 0, g.h).addmm_(dpre.t(), xg);
      db1.narrow(0, 0, g.h).add_(dpre.sum(0));
      dw2.narrow(1, 0, g.h).addmm_(gg.t(), act);
    }
  } else {
    dx.zero_();
  }
  return {dx.to(x.scalar_type()), dw1.to(w1.scalar_type()), db1.to(b1.scalar_type()),
          dw2.to(w2.scalar_type()), db2.to(b2.scalar_type())};
}

}  // namespace adaperceiver
