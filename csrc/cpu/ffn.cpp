// Matryoshka FFN on the CPU: the width-banded GEMMs of ffn_banded.cpp (oneDNN / MKL on weight
// slices, bf16 / fp16 in their dtype where the CPU has native GEMMs for it; units past a
// sample's width are never computed).
#include "common.h"
#include "ffn_banded.h"
#include "kernels.h"
#include "cpu/microkernel.h"
#include "cpu/vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace adaperceiver {
namespace cpu {

namespace {

// ---- bfloat16 on AMX tiles: the whole FFN per block of rows (at::native::cpublas::brgemm) ----
// Work items are runs of at most kTileRows consecutive rows of one width h (no sample order,
// gather or scatter: an item reads x and writes out in place). Per item, on one thread:
// fc1 in chunks of kTileUnits units, S (rows x units, float32) = X W1^T on the tiles, then the
// bias and the exact GELU in float32, rounded once to the dtype into the item's activation
// block A (rows x h); then fc2 over all h units at once, Y (rows x Cout, float32, starting
// from the bias) += A W2[:, :h]^T, rounded once into the output. So every output element is
// one float32 sum rounded once, and no unit past the item's width is multiplied. The weights
// are put in the tiles' VNNI layout (pairs along the reduction dimension interleaved) once per
// call, up to the largest width in the batch, shared by all items. An odd h reads one more
// unit (h rounded up to a pair) whose activation is set to 0, as the reference's mask does.
// Items go to the threads longest first, each to the least loaded (the costs are known, so
// the assignment is a function of the shape; an item's result does not depend on its thread).
constexpr int64_t kTileRows = 128;   // rows per item: the item's A and Y stay in L2
constexpr int64_t kTileUnits = 128;  // fc1 units per brgemm: S stays in L1/L2
constexpr int64_t kTileOut = 128;    // fc2 outputs per brgemm
constexpr int64_t kTileDepth = 32;   // bf16 / fp16 values an AMX tile row holds

struct TileItem {
  int64_t row0, rows, h;
};

// The rows of x (B * N of them, sample b's rows [b * N, (b + 1) * N)) as items: runs of equal
// width cut into pieces of at most kTileRows (fewer rows when that leaves a thread idle),
// assigned to `threads` lists.
std::vector<std::vector<TileItem>> tile_items(at::IntArrayRef hidden, int64_t N, int64_t threads) {
  const int64_t B = static_cast<int64_t>(hidden.size()), total = B * N;
  const int64_t want = std::max<int64_t>(1, (total + 2 * threads - 1) / (2 * threads));
  const int64_t piece = std::clamp<int64_t>((want + 31) / 32 * 32, 32, kTileRows);
  std::vector<TileItem> items;
  for (int64_t b = 0; b < B;) {
    int64_t e = b + 1;
    while (e < B && hidden[e] == hidden[b]) ++e;
    for (int64_t r = b * N; r < e * N; r += piece)
      items.push_back({r, std::min(piece, e * N - r), hidden[b]});
    b = e;
  }
  std::vector<size_t> order(items.size());
  std::iota(order.begin(), order.end(), 0);
  auto cost = [&](const TileItem& it) { return it.rows * (it.h + 64); };
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return cost(items[a]) > cost(items[b]); });
  std::vector<std::vector<TileItem>> lists(threads);
  std::vector<int64_t> load(threads, 0);
  for (size_t i : order) {
    const auto t = std::min_element(load.begin(), load.end()) - load.begin();
    lists[t].push_back(items[i]);
    load[t] += cost(items[i]);
  }
  return lists;
}

// w (n x k, row-major, row stride ldw, k even) transposed into the VNNI layout, in panels of
// `panel` rows of w, `stride` values apart: row j's pair p at dst[(j / panel) * stride + (p *
// panel + j % panel) * 2 + {0, 1}] (a brgemm's B operand per panel: pair rows of `panel`
// columns, ld = panel, one contiguous block). Parallel over blocks of 16 rows.
template <typename T>
void pack_vnni_panels(const T* w, int64_t n, int64_t k, int64_t ldw, int64_t panel,
                      int64_t stride, T* dst) {
  at::parallel_for(0, (n + 15) / 16, 4, [&](int64_t j0, int64_t j1) {
    for (int64_t jb = j0; jb < j1; ++jb) {
      const int64_t j = jb * 16, nrows = std::min<int64_t>(16, n - j);
      const uint16_t* rows[16];
      for (int64_t i = 0; i < nrows; ++i)
        rows[i] = reinterpret_cast<const uint16_t*>(w + (j + i) * ldw);
      pack_pairs_transposed(rows, nrows, k / 2,
                            reinterpret_cast<uint16_t*>(dst + (j / panel) * stride +
                                                        (j % panel) * 2),
                            panel);
    }
  });
}

// Why the AMX tile path does not take this forward ("" when it does).
std::string ffn_tiles_why_not(const at::Tensor& x, const at::Tensor& w2) {
  if (!x.device().is_cpu()) return "not a CPU tensor";
  std::string why = tiles_why_not(x.scalar_type(), x.size(2), w2.size(0));
  if (!why.empty()) return why;
  if (x.size(2) % 2) return "an odd number of input features (the tiles multiply pairs)";
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
  // fc2's reduction runs over whole tile depths (kTileDepth units: a partial one runs several
  // times slower), the units past an item's width with activation 0
  const int64_t hk = (hmax + kTileDepth - 1) / kTileDepth * kTileDepth;
  const int64_t panels1 = (hmax + kTileUnits - 1) / kTileUnits;
  const int64_t panels2 = (Cout + kTileOut - 1) / kTileOut;
  // W1^T in panels of kTileUnits units (C / 2 pair rows each), W2^T in panels of kTileOut
  // outputs (hk / 2 pair rows each, zeros past unit hmax); columns past hmax / Cout in the
  // last panels are never read into a result (left uninitialised)
  std::unique_ptr<T[]> w1p(new T[panels1 * C * kTileUnits]), w2p(new T[panels2 * hk * kTileOut]);
  pack_vnni_panels(w1.data_ptr<T>(), hmax, C, C, kTileUnits, C * kTileUnits, w1p.get());
  pack_vnni_panels(w2.data_ptr<T>(), Cout, hmax - hmax % 2, H, kTileOut, hk * kTileOut,
                   w2p.get());
  const T* w2d = w2.data_ptr<T>();
  for (int64_t p = 0; p < panels2; ++p) {  // pair rows from hmax / 2 on: (w2[hmax - 1], 0), 0
    T* rest = w2p.get() + (p * hk + hmax / 2 * 2) * kTileOut;
    std::fill(rest, rest + (hk - hmax / 2 * 2) * kTileOut, T(0));
    if (hmax % 2)
      for (int64_t j = 0; j < std::min(kTileOut, Cout - p * kTileOut); ++j)
        rest[2 * j] = w2d[(p * kTileOut + j) * H + hmax - 1];
  }
  const at::Tensor b1f = b1.to(at::kFloat).contiguous(), b2f = b2.to(at::kFloat).contiguous();
  const float* bias1 = b1f.data_ptr<float>();
  const float* bias2 = b2f.data_ptr<float>();
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t threads = at::get_num_threads();
  const auto lists = tile_items(hidden, N, threads);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S(kTileRows * kTileUnits), Y(kTileRows * Cout);
    std::vector<T> A(kTileRows * hk);
    for (int64_t t = t0; t < t1; ++t) {
      for (const TileItem& it : lists[t]) {
        const int64_t rows = it.rows, h = it.h;
        const int64_t k2 = (h + kTileDepth - 1) / kTileDepth * kTileDepth;
        const T* xr = xp + it.row0 * C;
        for (int64_t u0 = 0; u0 < h; u0 += kTileUnits) {  // fc1, bias, GELU -> A
          const int64_t nu = std::min(kTileUnits, h - u0);
          const int64_t nw = std::min(kTileUnits, (nu + 31) / 32 * 32);  // tile columns run
          at::native::cpublas::brgemm(rows, nw, C, C, kTileUnits, kTileUnits, false, xr,
                                      w1p.get() + (u0 / kTileUnits) * C * kTileUnits, S.data(),
                                      true);
          for (int64_t r = 0; r < rows; ++r) {
            float* s = S.data() + r * kTileUnits;
            bias_gelu_row(s, bias1 + u0, nu);
            scale_row_lowp(kBf16, s, 1.f, nu,
                                reinterpret_cast<uint16_t*>(A.data() + r * hk + u0));
          }
        }
        for (int64_t r = 0; r < rows; ++r) std::fill(&A[r * hk + h], &A[r * hk + k2], T(0));
        for (int64_t r = 0; r < rows; ++r)
          std::copy(bias2, bias2 + Cout, Y.data() + r * Cout);
        for (int64_t o0 = 0; o0 < Cout; o0 += kTileOut) {  // fc2 into Y
          const int64_t no = std::min(kTileOut, Cout - o0);
          at::native::cpublas::brgemm(rows, no, k2, hk, kTileOut, Cout, true, A.data(),
                                      w2p.get() + (o0 / kTileOut) * hk * kTileOut,
                                      Y.data() + o0, true);
        }
        for (int64_t r = 0; r < rows; ++r)
          scale_row_lowp(kBf16, Y.data() + r * Cout, 1.f, Cout,
                              reinterpret_cast<uint16_t*>(op + (it.row0 + r) * Cout));
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  return out;
}

}  // namespace

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

at::Tensor ffn_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  check_ffn_args(x, w1, b1, w2, b2, hidden);
  TORCH_CHECK(x.device().is_cpu(), "matryoshka_ffn_fwd (CPU kernel) got tensors on ", x.device());
  if (ffn_tiles_why_not(x, w2).empty()) {
    return x.scalar_type() == at::kBFloat16
               ? ffn_fwd_tiles<c10::BFloat16>(x, w1, b1, w2, b2, hidden)
               : ffn_fwd_tiles<c10::Half>(x, w1, b1, w2, b2, hidden);
  }
  return ffn_fwd_banded(x, w1, b1, w2, b2, hidden);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  TORCH_CHECK(x.device().is_cpu(), "matryoshka_ffn_bwd (CPU kernel) got tensors on ", x.device());
  return ffn_bwd_banded(grad_out, x, w1, b1, w2, b2, hidden);
}

}  // namespace cpu
}  // namespace adaperceiver
