// Matryoshka FFN on the CPU: the width-banded GEMMs of ffn_banded.cpp (oneDNN / MKL on weight
// slices, bf16 / fp16 in their dtype where the CPU has native GEMMs for it; units past a
// sample's width are never computed), and for a small batch of several widths in bf16 / fp16
// on AMX, the forward on the tiles below (each weight read once per call, float32 sums); and
// the elementwise pass of the bf16 / fp16 backward (gelu_backward_lowp_, column_sums).
#include "common.h"
#include "ffn_banded.h"
#include "kernels.h"
#include "cpu/microkernel.h"
#include "cpu/vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace adaperceiver {
namespace cpu {

namespace {

// ---- a small mixed-width batch in bfloat16 / float16 on AMX tiles (cpublas::brgemm) ----
// For few rows the GEMMs are bound by reading the weights, and one GEMM pair per distinct
// width (ffn_banded.cpp's path) reads them once per width. Here every weight panel is read
// once per call, by the thread that owns it, and multiplied with all the rows that need it:
//  * fc1, panels of kUnits hidden units (parallel over panels): the panel of W1^T put in the
//    tiles' VNNI layout (pairs along C interleaved), then for each block of rows whose width
//    passes the panel's start, S (rows x kUnits, float32) = X W1^T on the tiles, the bias and
//    the exact GELU in float32, rounded once into the activations A (rows x hk, the widest
//    width rounded up to a tile depth); a row's columns from its width to the next tile depth
//    are set to 0;
//  * fc2, panels of kOut outputs (parallel over panels): the panel of W2^T in VNNI layout
//    (units past the widest width zero), then for each block of rows of one width h, Y (rows x
//    kOut, float32, starting from the bias) = A[:, :k] W2^T over k = h rounded up to a tile
//    depth (the extra units' activations are 0: the reference's mask), rounded once into the
//    output. Every output element is one float32 sum rounded once; units past a row's width
//    add nothing but the reference's 0 * weight.
// Panels go to the threads largest first, each to the least loaded (a function of the shape
// only; a panel's result does not depend on its thread). x's rows are read and the output
// written in place (no sample order, gather or scatter).
constexpr int64_t kUnits = 64;      // fc1 panel width (hidden units)
constexpr int64_t kOut = 64;        // fc2 panel width (outputs)
constexpr int64_t kBlockRows = 64;  // rows per brgemm
constexpr int64_t kDepth = 32;      // 16-bit values per AMX tile row: a partial depth is slow

// The tile path takes a batch with several widths and at most this many rows; larger batches
// run the per-width oneDNN GEMMs of ffn_banded.cpp, which are faster once each GEMM is tall
// enough to pay for its weight reads (the crossover: benchmarks/README.md).
constexpr int64_t kTilesMaxRows = 384;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct RowBlock {
  int64_t row0, rows, h;
};

// Rows of x (sample b: rows [b * N, (b + 1) * N)) as blocks of at most kBlockRows rows of one
// width, in row order.
std::vector<RowBlock> row_blocks_by_width(at::IntArrayRef hidden, int64_t N) {
  const int64_t B = static_cast<int64_t>(hidden.size());
  std::vector<RowBlock> blocks;
  for (int64_t b = 0; b < B;) {
    int64_t e = b + 1;
    while (e < B && hidden[e] == hidden[b]) ++e;
    for (int64_t r = b * N; r < e * N; r += kBlockRows)
      blocks.push_back({r, std::min(kBlockRows, e * N - r), hidden[b]});
    b = e;
  }
  return blocks;
}

// Panels 0..n-1 with costs cost[p] spread over `threads` lists, largest first to the least
// loaded.
std::vector<std::vector<int64_t>> spread(const std::vector<int64_t>& cost, int64_t threads) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<std::vector<int64_t>> lists(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t p : order) {
    const auto t = std::min_element(load.begin(), load.end()) - load.begin();
    lists[t].push_back(p);
    load[t] += cost[p];
  }
  return lists;
}

// run(p, scratch) for every panel p (costs cost[p]) on get_num_threads() threads, each with
// its own scratch from make_scratch(); the tiles' state is handed back at the end.
template <typename Make, typename Run>
void run_panels(const std::vector<int64_t>& cost, Make make_scratch, Run run) {
  const auto lists = spread(cost, at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(lists.size()), 1, [&](int64_t t0, int64_t t1) {
    auto scratch = make_scratch();
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t p : lists[t]) run(p, scratch);
    at::native::cpublas::brgemm_release(true);
  });
}

// Rows [j0, j0 + n) of w (row stride ldw), their first k values (k even), as the VNNI
// transpose: pair p of row j0 + i at dst[(p * n_ld + i) * 2 + {0, 1}].
template <typename T>
void pack_rows_vnni(const T* w, int64_t ldw, int64_t j0, int64_t n, int64_t k, T* dst,
                    int64_t n_ld) {
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t nrows = std::min<int64_t>(16, n - i0);
    const uint16_t* rows[16];
    for (int64_t i = 0; i < nrows; ++i)
      rows[i] = reinterpret_cast<const uint16_t*>(w + (j0 + i0 + i) * ldw);
    pack_pairs_transposed(rows, nrows, k / 2, reinterpret_cast<uint16_t*>(dst + i0 * 2), n_ld);
  }
}

// Why the tile path does not take this forward ("" when it does).
std::string ffn_tiles_why_not(const at::Tensor& x, const at::Tensor& w2,
                              at::IntArrayRef hidden) {
  std::string why = tiles_why_not(x.scalar_type(), x.size(2), w2.size(0));
  if (!why.empty()) return why;
  if (x.size(2) % 2) return "an odd number of input features (the tiles multiply pairs)";
  if (std::adjacent_find(hidden.begin(), hidden.end(), std::not_equal_to<>()) == hidden.end())
    return "one width (one GEMM pair reads each weight once)";
  if (x.size(0) * x.size(1) > kTilesMaxRows) return "more rows than kTilesMaxRows";
  return "";
}

template <typename T>
at::Tensor ffn_fwd_tiles(const at::Tensor& x_, const at::Tensor& w1_, const at::Tensor& b1,
                         const at::Tensor& w2_, const at::Tensor& b2, at::IntArrayRef hidden) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const at::Tensor x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), H = w1.size(0), Cout = w2.size(0);
  at::Tensor out = at::empty({B, N, Cout}, x.options());
  if (B * N * Cout == 0) return out;
  const int64_t hmax = *std::max_element(hidden.begin(), hidden.end());
  const int64_t hk = round_up(hmax, kDepth), rows_total = B * N;
  const auto blocks = row_blocks_by_width(hidden, N);
  const at::Tensor b1f = b1.to(at::kFloat).contiguous(), b2f = b2.to(at::kFloat).contiguous();
  const float* bias1 = b1f.data_ptr<float>();
  const float* bias2 = b2f.data_ptr<float>();
  const T* xp = x.data_ptr<T>();
  const T* w1d = w1.data_ptr<T>();
  const T* w2d = w2.data_ptr<T>();
  T* op = out.data_ptr<T>();
  std::unique_ptr<T[]> act(new T[rows_total * hk]);

  // fc1 + bias + GELU -> act, parallel over panels of units
  std::vector<int64_t> cost1((hmax + kUnits - 1) / kUnits, 0);
  for (const RowBlock& bl : blocks)
    for (int64_t p = 0; p * kUnits < bl.h; ++p) cost1[p] += bl.rows;
  run_panels(cost1, [&] {
    return std::make_pair(std::vector<T>(C * kUnits), std::vector<float>(kBlockRows * kUnits));
  }, [&](int64_t p, auto& scratch) {
    auto& [panel, S] = scratch;
    const int64_t u0 = p * kUnits;
    pack_rows_vnni(w1d, C, u0, std::min(kUnits, hmax - u0), C, panel.data(), kUnits);
    for (const RowBlock& bl : blocks) {
      if (bl.h <= u0) continue;
      const int64_t nu = std::min(kUnits, bl.h - u0);
      at::native::cpublas::brgemm(bl.rows, round_up(nu, kDepth), C, C, kUnits, kUnits, false,
                                  xp + bl.row0 * C, panel.data(), S.data(), true);
      const int64_t zero_to = std::min(round_up(bl.h, kDepth), u0 + kUnits) - u0;
      for (int64_t r = 0; r < bl.rows; ++r) {
        float* s = S.data() + r * kUnits;
        T* a = act.get() + (bl.row0 + r) * hk + u0;
        bias_gelu_row(s, bias1 + u0, nu);
        scale_row_lowp(kBf16, s, 1.f, nu, reinterpret_cast<uint16_t*>(a));
        std::fill(a + nu, a + std::max(nu, zero_to), T(0));
      }
    }
  });

  // fc2 + bias -> out, parallel over panels of outputs
  const int64_t hpairs = hmax / 2;  // whole pairs of units below hmax
  run_panels(std::vector<int64_t>((Cout + kOut - 1) / kOut, 1), [&] {
    return std::make_pair(std::vector<T>(hk * kOut), std::vector<float>(kBlockRows * kOut));
  }, [&](int64_t p, auto& scratch) {
    auto& [panel, Y] = scratch;
    const int64_t o0 = p * kOut, no = std::min(kOut, Cout - o0);
    pack_rows_vnni(w2d, H, o0, no, 2 * hpairs, panel.data(), kOut);
    std::fill(panel.begin() + hpairs * 2 * kOut, panel.end(), T(0));
    if (hmax % 2)  // the last unit, paired with a zero
      for (int64_t j = 0; j < no; ++j)
        panel[(hpairs * kOut + j) * 2] = w2d[(o0 + j) * H + hmax - 1];
    for (const RowBlock& bl : blocks) {
      for (int64_t r = 0; r < bl.rows; ++r)
        std::copy(bias2 + o0, bias2 + o0 + no, Y.data() + r * kOut);
      at::native::cpublas::brgemm(bl.rows, no, round_up(bl.h, kDepth), hk, kOut, kOut, true,
                                  act.get() + bl.row0 * hk, panel.data(), Y.data(), true);
      for (int64_t r = 0; r < bl.rows; ++r)
        scale_row_lowp(kBf16, Y.data() + r * kOut, 1.f, no,
                       reinterpret_cast<uint16_t*>(op + (bl.row0 + r) * Cout + o0));
    }
  });
  return out;
}

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
  if (ffn_tiles_why_not(x, w2, hidden).empty()) {
    return x.scalar_type() == at::kBFloat16
               ? ffn_fwd_tiles<c10::BFloat16>(x, w1, b1, w2, b2, hidden)
               : ffn_fwd_tiles<c10::Half>(x, w1, b1, w2, b2, hidden);
  }
  return ffn_fwd_banded(x, w1, b1, w2, b2, hidden);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(
    ADAPERCEIVER_FFN_BWD_PARAMS) {
  TORCH_CHECK(x.device().is_cpu(), "matryoshka_ffn_bwd (CPU kernel) got tensors on ", x.device());
  return ffn_bwd_banded(grad_out, x, w1, b1, w2, b2, hidden);
}

}  // namespace cpu
}  // namespace adaperceiver
