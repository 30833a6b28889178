// Matryoshka FFN grouped by width, written with ATen GEMMs on weight prefixes (device-generic).
//
// Computes out[b] = fc2(GELU(fc1(x[b]))[:, :h_b]) with fc2 reading only its first h_b input
// columns, i.e. adaperceiver/ops/reference.py ffn_forward/ffn_backward without paying for the
// masked units. Schedule: samples are grouped by width (widest first); each group runs two
// GEMMs on the prefixes fc1_weight[:h] and fc2_weight[:, :h]. A group whose samples are adjacent
// in the batch is read and written in place (views, no copy); otherwise its rows are gathered
// (the forward also runs in place, run by run, when every run has >= 1024 rows).
// Skipped: every hidden unit past a sample's width (never computed, gets no gradient).
// float32 and float64 run as they are; bfloat16/float16 compute in float32 and cast back.
#include "common.h"
#include "ffn_grouped.h"
#include "kernels.h"

#include <map>

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

at::Tensor ffn_fwd_grouped(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  const auto wt = work_type(x.scalar_type());
  at::Tensor xw = x.to(wt).contiguous(), w1w = w1.to(wt), b1w = b1.to(wt), w2w = w2.to(wt),
             b2w = b2.to(wt);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Cout = w2.size(0);
  at::Tensor out = at::empty({B, N, Cout}, xw.options());
  if (out.numel() == 0) return out.to(x.scalar_type());
  const auto groups = groups_by_width(hidden);
  // A group that is one run of adjacent samples is read and written in place (views). Other
  // groups are gathered with one index_select and scattered with one index_copy_, unless every
  // run is long (>= kMinRows rows), where per-run GEMMs in place are cheaper than the copies.
  // Few, large ATen calls matter on a busy machine: each one is a parallel region whose threads
  // must all be scheduled.
  constexpr int64_t kMinRows = 1024;
  int64_t act_rows = 0;
  for (const auto& g : groups) act_rows = std::max<int64_t>(act_rows, g.idx.size() * N);
  // one activation buffer for all groups (fresh allocations fault in new pages every call)
  at::Tensor act_buf = at::empty({act_rows * w1.size(0)}, xw.options());
  // on the CPU in float32, fc1's bias joins the GELU pass (cpu/ffn.cpp) rather than being
  // copied into the GEMM's output first
  const bool cpu_bias_gelu = xw.device().is_cpu() && wt == at::kFloat;
  auto run_pair = [&](const at::Tensor& xg, int64_t h, at::Tensor& dst) {
    at::Tensor act = act_buf.narrow(0, 0, xg.size(0) * h).view({xg.size(0), h});
    if (cpu_bias_gelu) {
      at::mm_out(act, xg, w1w.narrow(0, 0, h).t());
      cpu::bias_gelu_(act, b1w);
    } else {
      at::addmm_out(act, b1w.narrow(0, 0, h), xg, w1w.narrow(0, 0, h).t());
      at::gelu_(act);
    }
    at::addmm_out(dst, b2w, act, w2w.narrow(1, 0, h).t());
  };
  for (const auto& g : groups) {
    // maximal runs of adjacent samples [s, e)
    std::vector<std::pair<int64_t, int64_t>> runs;
    for (int64_t b : g.idx) {
      if (!runs.empty() && runs.back().second == b) ++runs.back().second;
      else runs.emplace_back(b, b + 1);
    }
    bool in_place = true;
    for (const auto& r : runs) in_place = in_place && (r.second - r.first) * N >= kMinRows;
    if (in_place || runs.size() == 1) {
      for (const auto& r : runs) {
        at::Tensor dst = out.narrow(0, r.first, r.second - r.first).view({-1, Cout});
        run_pair(xw.narrow(0, r.first, r.second - r.first).view({-1, C}), g.h, dst);
      }
    } else {
      const at::Tensor idx = index_tensor(g, x.device());
      at::Tensor xg = xw.index_select(0, idx).view({-1, C});
      at::Tensor res = at::empty({xg.size(0), Cout}, xw.options());
      run_pair(xg, g.h, res);
      out.index_copy_(0, idx, res.view({-1, N, Cout}));
    }
  }
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
