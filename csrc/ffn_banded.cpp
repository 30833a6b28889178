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
// Skipped: every hidden unit past a sample's width (never computed, gets no gradient), but on
// the one-pair path for small batches (padded_pair below), which computes the units up to the
// batch's widest width (on the tile GEMM: its row block's widest) and takes them as 0 past each
// sample's own.
// float32 runs as it is. bfloat16/float16 forward on a CPU with native GEMMs for the dtype
// (cpu::native_bf16_gemm / native_fp16_gemm: AVX512-BF16 / AMX, AVX512-FP16 / AMX-FP16) runs
// in the dtype through oneDNN, float32 accumulation inside each GEMM: fc1 with its bias and the
// exact (erf) GELU as the GEMM's post-op, fc2 with its bias fused (full width) or in place on
// its column slice, one pair of GEMMs per distinct width (not per band) so that every output
// element is rounded once, on that width's samples (copied in and out around the pair unless
// consecutive; no global sort); no weight or activation is copied to float32. On AMX at 2
// threads a pair on 768..2047 rows runs on one block of rows per thread, fc1 and fc2 of a
// block on the same thread, so that its hidden activation stays in that core's cache
// (cpu::ffn_thread_rows, cpu/onednn.h); a thread gathers its block's rows from samples that
// are not consecutive and scatters its results back itself. GEMMs the row-chunk rule names
// (cpu::gemm_row_chunks: oneDNN would run them on one of 2 threads) otherwise run on row
// blocks, consecutive ones for fc1 and for fc2 on a column slice, one per thread for fc2 at
// full width (cpu::linear_row_blocks).
// A small batch of several widths on AMX (padded_pair) runs one pair at its widest width instead,
// each sample's units past its width zeroed between the two (the reference's 0/1 mask); at up
// to 448 rows in bfloat16 (the tile GEMM, cpu::tile_linear_takes with row extents) each block
// of 32 rows computes fc1's units only up to the widest width among its rows, and fc2 takes
// each row's units past its own width as 0 (cpu::RowExtents).
// The backward on such a CPU runs in the dtype too (ffn_bwd_low_precision), every GEMM in the
// dtype with float32 accumulation: per band, pre = x w1b^T + b1b recomputed (oneDNN, bias
// fused), g w2b, then one pass (cpu::gelu_backward_lowp_) that writes dpre =
// gelu_backward(g w2b, pre) into the band's columns of one buffer D, GELU(pre) over pre, and
// the column sums of dpre (db1); dW1 band rows = dpre^T x and dW2 band columns = g^T GELU(pre)
// (each band owns its slices: every element rounded once). dx sums over the bands, so it runs
// after them as one GEMM per distinct width on D's rows of that width (a width-h sample's
// dpre fills its row's columns [0, h)), as the forward runs fc2: every element rounded once,
// where rounding each band's product would round once per band. db2 is a float32 column sum
// rounded once. float16 on a CPU with AMX-BF16 but no AMX-FP16 (where oneDNN's and ATen's
// float16 GEMMs run at about float32 speed) runs those GEMMs on the tile GEMM as exact bfloat16
// pairs (cpu/tile_linear.cpp), the same float32 sums of exact products rounded once, its
// transposed operands copied contiguous first (backward_on_tiles, contiguous_16bit).
// ADAPERCEIVER_FFN_BWD=float32 (read on every call) forces the float32 path.
// Otherwise (other CPUs, other devices) bfloat16/float16 compute in float32 and cast back.
#include "common.h"
#include "ffn_banded.h"
#include "kernels.h"
#include "cpu/microkernel.h"
#include "cpu/onednn.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace adaperceiver {

namespace {

// Whether ids are consecutive sample indices (ids[i] == ids[0] + i).
bool consecutive(const std::vector<int64_t>& ids) {
  for (size_t i = 1; i < ids.size(); ++i)
    if (ids[i] != ids[0] + static_cast<int64_t>(i)) return false;
  return true;
}

// Rows [r0, r1) of the width group of samples ids (group row r is row r % N of sample
// ids[r / N]) between the samples (B, N, F; contiguous CPU) and rows (r1 - r0, F; contiguous):
// into rows, or back into the samples (to_samples), one memcpy per run of a sample's rows.
void copy_group_rows(const at::Tensor& samples, const std::vector<int64_t>& ids, int64_t r0,
                     int64_t r1, const at::Tensor& rows, bool to_samples) {
  const int64_t N = samples.size(1);
  const size_t row_bytes = static_cast<size_t>(samples.size(2)) * samples.element_size();
  char* s = static_cast<char*>(samples.data_ptr());
  char* d = static_cast<char*>(rows.data_ptr());
  for (int64_t r = r0; r < r1;) {
    const int64_t run = std::min(r1, (r / N + 1) * N) - r;
    char* sp = s + (ids[r / N] * N + r % N) * row_bytes;
    char* dp = d + (r - r0) * row_bytes;
    std::memcpy(to_samples ? sp : dp, to_samples ? dp : sp, run * row_bytes);
    r += run;
  }
}

// Samples ids[0..n) of src (B, N, F; contiguous CPU) as one (n * N, F) matrix: a view when they
// are consecutive, else a copy made one sample per memcpy (index_select / index_copy_ take an
// element-wise path for bfloat16 that costs as much as the GEMMs).
at::Tensor take_samples(const at::Tensor& src, const std::vector<int64_t>& ids) {
  const int64_t n = static_cast<int64_t>(ids.size()), N = src.size(1), F = src.size(2);
  if (n == 0) return at::empty({0, F}, src.options());
  if (consecutive(ids)) return src.narrow(0, ids.front(), n).view({n * N, F});
  at::Tensor out = at::empty({n * N, F}, src.options());
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    copy_group_rows(src, ids, i0 * N, i1 * N, out.narrow(0, i0 * N, (i1 - i0) * N), false);
  });
  return out;
}

// rows (n * N, F) back to samples ids[0..n) of dst (B, N, F; contiguous CPU), one memcpy per
// sample.
void put_samples(at::Tensor& dst, const at::Tensor& rows, const std::vector<int64_t>& ids) {
  const int64_t n = static_cast<int64_t>(ids.size()), N = dst.size(1);
  const at::Tensor src = rows.contiguous();
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    copy_group_rows(dst, ids, i0 * N, i1 * N, src.narrow(0, i0 * N, (i1 - i0) * N), true);
  });
}

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
    if (in_order) return t.reshape({-1, t.size(2)});
    if (!t.device().is_cpu()) return t.index_select(0, idx).reshape({-1, t.size(2)});
    return take_samples(t.contiguous(), perm);
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
    if (in_order) return;
    if (dst.device().is_cpu() && dst.is_contiguous()) {
      put_samples(dst, rows, perm);
    } else {
      dst.index_copy_(0, idx, rows.view(dst.sizes()));
    }
  }
};

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
    if (std::optional<at::Tensor> y = cpu::onednn_linear(x, w, bias)) return *y;
  }
  return bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

// The row blocks [r0, r1) of a GEMM on `rows` rows (cpu::gemm_row_chunks of them, cpu/onednn.h
// says why; starts on multiples of 32 rows)
std::vector<std::pair<int64_t, int64_t>> row_blocks(int64_t rows, int64_t outputs,
                                                    at::ScalarType dtype) {
  const int64_t chunks = cpu::gemm_row_chunks(rows, outputs, dtype);
  const int64_t step = chunks == 1 ? std::max<int64_t>(rows, 1)
                                   : ((rows + chunks - 1) / chunks + 31) / 32 * 32;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t r0 = 0; r0 < rows; r0 += step) out.emplace_back(r0, std::min(rows, r0 + step));
  return out;
}

// run(x) (rows x outputs) on the row blocks of row_blocks, their results copied into one
// output when the rule cuts the rows.
template <typename Run>
at::Tensor on_row_blocks(const at::Tensor& x, int64_t outputs, Run run) {
  const auto blocks = row_blocks(x.size(0), outputs, x.scalar_type());
  if (blocks.size() <= 1) return run(x);
  at::Tensor out = at::empty({x.size(0), outputs}, x.options());
  for (const auto& [r0, r1] : blocks)
    out.narrow(0, r0, r1 - r0).copy_(run(x.narrow(0, r0, r1 - r0)));
  return out;
}

// fc1 of one band in the low-precision dtype on the CPU: GELU(x w^T + bias) through oneDNN
// with the bias and the exact GELU as post-ops (one rounding of the float32 result), or ATen's
// addmm and gelu when oneDNN is not there. On row blocks (cpu::gemm_row_chunks) copied into one
// output when the rule cuts the rows. Where the tile GEMM takes it (cpu::tile_linear_takes:
// bfloat16 at few rows, float16 as bfloat16 pairs, on AMX-BF16) it runs there, the GELU in its
// epilogue.
at::Tensor fc1_gelu_low_precision(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (!cpu::onednn_linear_available()) return at::gelu(at::addmm(b, x, w.t()));
  if (cpu::tile_linear_takes(x.size(0), x.scalar_type())) {
    return cpu::tile_linear(x, w, b, cpu::PostOp::kGelu);  // the GELU in its epilogue
  }
  const at::Tensor wc = w.contiguous();
  return on_row_blocks(x, w.size(0), [&](const at::Tensor& xr) {
    return *cpu::onednn_linear(xr, wc, b, cpu::PostOp::kGelu);
  });
}

// Every row of dst (rows x n, unit column stride) set to v (n values of dst's dtype) by row
// copies: ATen's copy_ of the expanded bias (what addmm does with a bias argument) takes an
// element-wise path for bfloat16 that cost as much as the GEMM itself.
void fill_rows(at::Tensor& dst, const at::Tensor& v) {
  TORCH_CHECK(dst.dim() == 2 && dst.stride(1) == 1 && v.numel() == dst.size(1) &&
                  v.scalar_type() == dst.scalar_type(),
              "fill_rows: dst must be a matrix of unit column stride and v one of its rows");
  const at::Tensor vc = v.contiguous();
  const size_t bytes = static_cast<size_t>(dst.size(1)) * dst.element_size();
  const char* src = static_cast<const char*>(vc.data_ptr());
  char* base = static_cast<char*>(dst.data_ptr());
  const int64_t row_bytes = dst.stride(0) * dst.element_size();
  at::parallel_for(0, dst.size(0), 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(base + r * row_bytes, src, bytes);
  });
}

// fc2 of one width in the low-precision dtype on the CPU: act (rows x h) times the first h
// columns of w2, plus b2, into dst (rows x Cout; a new tensor when dst is undefined), which it
// returns. At few rows in bfloat16 on AMX, and in float16 on AMX-BF16 without AMX-FP16
// (cpu::tile_linear_takes), the tile GEMM, which reads the slice in place and the weight without
// reordering it. Otherwise the full width (a contiguous weight) runs on oneDNN's inner product
// with the bias fused: one GEMM, or, where the rule says oneDNN would run it on one of 2
// threads, one block of rows per thread, one oneDNN GEMM each (cpu::linear_row_blocks, as
// ops.linear runs the model's projections of that shape). A column slice (oneDNN would take its
// reference kernel on it) runs as ATen's addmm on the slice in place (on consecutive row blocks
// in that band), a BLAS-style leading dimension the bf16 GEMM takes as it is, accumulating into
// dst filled with the bias.
at::Tensor fc2_low_precision(const at::Tensor& act, const at::Tensor& w2, const at::Tensor& b2,
                             int64_t h, at::Tensor dst) {
  const auto into_dst = [&](const at::Tensor& y) { return dst.defined() ? dst.copy_(y) : y; };
  if (cpu::tile_linear_takes(act.size(0), act.scalar_type())) {
    return into_dst(cpu::tile_linear(act, w2.narrow(1, 0, h), b2));  // a column slice in place
  }
  const auto blocks = row_blocks(act.size(0), w2.size(0), act.scalar_type());
  if (cpu::onednn_linear_available() && h == w2.size(1) && w2.is_contiguous()) {
    if (blocks.size() == 1) return into_dst(*cpu::onednn_linear(act, w2, b2));
    // the one-thread band: one block of rows per thread, as ops.linear runs it
    return into_dst(cpu::linear_row_blocks(
        act, w2, b2, cpu::gemm_thread_rows(act.size(0), w2.size(0), act.scalar_type())));
  }
  if (!dst.defined()) dst = at::empty({act.size(0), w2.size(0)}, act.options());
  fill_rows(dst, b2);
  const at::Tensor w2t = w2.narrow(1, 0, h).t();
  for (const auto& [q0, q1] : blocks) {
    at::Tensor d = dst.narrow(0, q0, q1 - q0);
    at::addmm_out(d, d, act.narrow(0, q0, q1 - q0), w2t);  // d += act w2^T: the bias added
  }                                                         // in float32, one rounding
  return dst;
}

// One width's pair in the low-precision dtype on the CPU, fc2(GELU(fc1(x))) over the first h
// hidden units (w1h, b1h: fc1's first h rows), on the samples ids of xc (B, N, C; contiguous),
// written into the same samples of out (B, N, Cout). Where cpu::ffn_thread_rows names a block
// size for the group's rows, each thread runs the pair on its own consecutive rows of the group,
// so that a block's hidden activation stays in its core's cache between the two GEMMs: read and
// written in place when the samples are consecutive, else gathered into the thread's block and
// its results scattered back by that thread. Otherwise fc1 on all the group's rows, then fc2
// (consecutive samples in place, else copied in before and out after).
void pair_on_samples(const at::Tensor& xc, const std::vector<int64_t>& ids, const at::Tensor& w1h,
                     const at::Tensor& b1h, const at::Tensor& w2, const at::Tensor& b2, int64_t h,
                     at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(ids.size()), N = xc.size(1), C = xc.size(2);
  const int64_t Cout = out.size(2), rows = n * N;
  const int64_t block = cpu::ffn_thread_rows(rows, xc.scalar_type());
  const bool in_place = consecutive(ids);
  const at::Tensor x = in_place ? xc.narrow(0, ids.front(), n).view({rows, C}) : at::Tensor();
  at::Tensor dst = in_place ? out.narrow(0, ids.front(), n).view({rows, Cout}) : at::Tensor();
  if (block == 0) {
    const at::Tensor act = fc1_gelu_low_precision(take_samples(xc, ids), w1h, b1h);
    if (in_place) {  // fc2 into these samples' rows, bias included
      fc2_low_precision(act, w2, b2, h, dst);
    } else {
      put_samples(out, fc2_low_precision(act, w2, b2, h, at::Tensor()), ids);
    }
    return;
  }
  at::parallel_for(0, (rows + block - 1) / block, 1, [&](int64_t i0, int64_t i1) {
    c10::InferenceMode guard;  // temporaries and views no autograd will see
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * block, nr = std::min(block, rows - r0);
      if (in_place) {
        fc2_low_precision(fc1_gelu_low_precision(x.narrow(0, r0, nr), w1h, b1h), w2, b2, h,
                          dst.narrow(0, r0, nr));
        continue;
      }
      at::Tensor xb = at::empty({nr, C}, xc.options());
      copy_group_rows(xc, ids, r0, r0 + nr, xb, /*to_samples=*/false);
      at::Tensor yb = fc2_low_precision(fc1_gelu_low_precision(xb, w1h, b1h), w2, b2, h,
                                        at::Tensor()).contiguous();
      copy_group_rows(out, ids, r0, r0 + nr, yb, /*to_samples=*/true);
    }
  });
}

// True when x's dtype runs natively on this CPU (see the file's comment).
bool native_low_precision(const at::Tensor& x) {
  if (!x.device().is_cpu()) return false;
  if (x.scalar_type() == at::kBFloat16) return cpu::native_bf16_gemm();
  if (x.scalar_type() == at::kHalf) return cpu::native_fp16_gemm();
  return false;
}

// Whether a batch of several widths and `rows` rows (B * N) runs as one GEMM pair at the widest
// width, each sample's units past its own width set to 0 between fc1 and fc2, instead of one
// pair per width. Where oneDNN multiplies the dtype on AMX tiles (tiles_why_not: the attention's
// test, ADAPERCEIVER_CPU_ISA=avx512 included), a GEMM of a few hundred rows costs about what
// reading and reordering its weights costs, so one pair that reads each weight once beats a
// pair per width that re-reads them, the padded units' FLOPs notwithstanding; at 1024 rows the
// FLOPs decide (figures: benchmarks/README.md). Elsewhere (float16 without AMX-FP16, AVX512-BF16
// alone, ADAPERCEIVER_CPU_GEMM=mkl) the GEMMs are bound by their FLOPs: a pair per width. A
// function of the shape, the machine and the process's settings (the environment, and
// torch.backends.mkldnn), never of timings or of what ran before.
constexpr int64_t kPaddedMaxRows = 512;

bool padded_pair(int64_t rows, at::ScalarType dtype, int64_t C, int64_t Cout) {
  return rows <= kPaddedMaxRows && cpu::onednn_linear_available() &&
         cpu::tiles_why_not(dtype, C, Cout).empty();
}

// act (B * N rows of hm units, contiguous): sample b's units from hidden[b] on set to 0, so
// that fc2 over all hm units adds nothing for them (but the reference's 0 * weight).
void zero_past_widths(at::Tensor& act, at::IntArrayRef hidden, int64_t N) {
  TORCH_CHECK(act.dim() == 2 && act.is_contiguous() && act.size(0) == N * int64_t(hidden.size()),
              "zero_past_widths: act must be a contiguous (B * N, hm) matrix");
  const int64_t hm = act.size(1), B = static_cast<int64_t>(hidden.size());
  const size_t es = act.element_size();
  char* base = static_cast<char*>(act.data_ptr());
  at::parallel_for(0, B * N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = hidden[r / N];
      if (h < hm) std::memset(base + (r * hm + h) * es, 0, (hm - h) * es);
    }
  });
}

// The forward in x's low-precision dtype (native_low_precision(x)).
// One pair of GEMMs per distinct width on the rows of that width's samples, not per band: each
// output element is then one GEMM's float32 sum rounded once, as in the reference, where
// per-band accumulation in the dtype would round once per band (more than the accuracy rule's
// 2x the reference's error in float16). Same FLOPs as the bands; fewer rows per GEMM. A width's
// samples are read in place and written in place when they are consecutive in the batch; else
// they are copied to a scratch just before their fc1 and their fc2 result copied back just
// after, while both are still in cache (no sort of the whole batch, no second copy of fc2's
// output).
at::Tensor ffn_fwd_low_precision(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& b2,
                                 at::IntArrayRef hidden) {
  const int64_t B = x.size(0), N = x.size(1), Cout = w2.size(0);
  if (B * N * Cout == 0) return at::empty({B, N, Cout}, x.options());
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> widths(hidden.begin(), hidden.end());
  std::sort(widths.begin(), widths.end());
  widths.erase(std::unique(widths.begin(), widths.end()), widths.end());
  if (widths.size() == 1) {  // one width: fc2 writes the output itself
    const int64_t h = widths[0];
    std::vector<int64_t> all(B);
    std::iota(all.begin(), all.end(), 0);
    at::Tensor out = at::empty({B, N, Cout}, x.options());
    pair_on_samples(xc, all, w1.narrow(0, 0, h), b1.narrow(0, 0, h), w2, b2, h, out);
    return out;
  }
  if (padded_pair(B * N, x.scalar_type(), x.size(2), Cout)) {  // one pair at the widest width
    const int64_t hm = widths.back();
    if (x.scalar_type() == at::kBFloat16 &&
        cpu::tile_linear_takes(B * N, at::kBFloat16, /*row_extents=*/true)) {
      // on the tile GEMM each row block stops at its samples' widest width (cpu::RowExtents)
      std::vector<int64_t> ext(B * N);
      for (int64_t r = 0; r < B * N; ++r) ext[r] = hidden[r / N];
      const cpu::RowExtents outs{cpu::RowExtents::kOutputs, ext.data()};
      const cpu::RowExtents inner{cpu::RowExtents::kInner, ext.data()};
      const at::Tensor act = cpu::tile_linear(xc.view({B * N, -1}), w1.narrow(0, 0, hm),
                                              b1.narrow(0, 0, hm), cpu::PostOp::kGelu, &outs);
      return cpu::tile_linear(act, w2.narrow(1, 0, hm), b2, cpu::PostOp::kNone, &inner)
          .view({B, N, Cout});
    }
    at::Tensor act = fc1_gelu_low_precision(xc.view({B * N, -1}), w1.narrow(0, 0, hm),
                                            b1.narrow(0, 0, hm));
    zero_past_widths(act, hidden, N);
    return fc2_low_precision(act, w2, b2, hm, at::Tensor()).view({B, N, Cout});
  }
  at::Tensor out = at::empty({B, N, Cout}, x.options());
  for (const int64_t h : widths) {
    std::vector<int64_t> ids;
    for (int64_t b = 0; b < B; ++b)
      if (hidden[b] == h) ids.push_back(b);
    pair_on_samples(xc, ids, w1.narrow(0, 0, h), b1.narrow(0, 0, h), w2, b2, h, out);
  }
  return out;
}

// Whether the backward runs in x's low-precision dtype (native_low_precision(x), grad_out in that
// dtype too), unless ADAPERCEIVER_FFN_BWD=float32 asks for the float32 computation (read on
// every call, so a benchmark can time both paths side by side in one process; any other value
// but "native" or unset is rejected).
bool native_low_precision_bwd(const at::Tensor& x, const at::Tensor& grad_out) {
  const std::string env = env_choice("ADAPERCEIVER_FFN_BWD");
  TORCH_CHECK(env.empty() || env == "native" || env == "float32", "ADAPERCEIVER_FFN_BWD=", env,
              " is not allowed; allowed: native (the default), float32");
  return env != "float32" && native_low_precision(x) &&
         grad_out.scalar_type() == x.scalar_type();
}

// Whether the backward's float16 GEMMs run on the tile GEMM as exact bfloat16 pairs
// (cpu::tile_linear_takes: a CPU with AMX-BF16 but no AMX-FP16, where oneDNN's and ATen's
// float16 GEMMs run at about float32 speed): float32 accumulation of exact products, one
// rounding, what those GEMMs compute, in another order.
bool backward_on_tiles(const at::Tensor& a) {
  return a.scalar_type() == at::kHalf && cpu::tile_linear_takes(a.size(0), at::kHalf);
}

// A contiguous copy of the 2-d 16-bit matrix m: when m is a transposed view (stride(0) == 1),
// by 64 x 64 blocks split between the threads (ATen's strided copy of such a view is several
// times slower; figures in benchmarks/README.md, "float16"); else m.contiguous().
at::Tensor contiguous_16bit(const at::Tensor& m) {
  if (m.is_contiguous() || m.stride(0) != 1 || m.element_size() != 2) return m.contiguous();
  constexpr int64_t kB = 64;
  const int64_t R = m.size(0), C = m.size(1), ld = m.stride(1);  // m[r][c] at src[c * ld + r]
  at::Tensor out = at::empty({R, C}, m.options());
  const auto* src = reinterpret_cast<const uint16_t*>(m.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, (R + kB - 1) / kB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t rb = b0 * kB; rb < std::min(R, b1 * kB); rb += kB) {
      const int64_t r1 = std::min(R, rb + kB);
      for (int64_t cb = 0; cb < C; cb += kB) {
        const int64_t c1 = std::min(C, cb + kB);
        for (int64_t r = rb; r < r1; ++r)
          for (int64_t c = cb; c < c1; ++c) dst[r * C + c] = src[c * ld + r];
      }
    }
  });
  return out;
}

// a (M, K) times b (K, N) on the tile GEMM, rounded once: a times the rows of b^T (the tile
// GEMM reads its weight by rows, so b^T is a contiguous copy, as a is when it is a transposed
// view).
at::Tensor tile_mm(const at::Tensor& a, const at::Tensor& b) {
  c10::InferenceMode no_grad;  // the backward's products: temporaries no autograd will see
  return cpu::tile_linear(contiguous_16bit(a), contiguous_16bit(b.t()), c10::nullopt);
}

// a times b in the low-precision dtype, rounded once: tile_mm where backward_on_tiles says so,
// else ATen's GEMM.
at::Tensor mm_low_precision(const at::Tensor& a, const at::Tensor& b) {
  return backward_on_tiles(a) ? tile_mm(a, b) : at::mm(a, b);
}

// The same product written into out (a slice of a gradient: ATen's GEMM writes it in place,
// the tile GEMM's result is copied in).
void mm_low_precision_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (backward_on_tiles(a)) {
    out.copy_(tile_mm(a, b));
  } else {
    at::mm_out(out, a, b);
  }
}

// x w^T + b in the low-precision dtype: one oneDNN GEMM with the bias fused (one rounding), or
// ATen's addmm when oneDNN is switched off; on row blocks where the row-chunk rule says
// oneDNN would run the product on one of 2 threads. float16 on the tile GEMM where
// backward_on_tiles says so (its bias added to the float32 sum, one rounding, as oneDNN's).
at::Tensor linear_low_precision(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (backward_on_tiles(x)) {
    c10::InferenceMode no_grad;
    return cpu::tile_linear(x, w, b);
  }
  return on_row_blocks(x, w.size(0), [&](const at::Tensor& xr) {
    if (std::optional<at::Tensor> y = cpu::onednn_linear(xr, w, b)) return *y;
    return at::addmm(b, xr, w.t());
  });
}

// The backward in x's low-precision dtype (native_low_precision_bwd; the schedule: the file's
// comment): each gradient element one GEMM's (or one float32 sum's) result rounded once, as
// in plain PyTorch autograd through the reference in the dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_low_precision(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, at::IntArrayRef hidden) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), H = w1.size(0), Cout = w2.size(0);
  const at::Tensor gc = grad_out.contiguous();
  at::Tensor dx = at::empty({B, N, C}, x.options());
  at::Tensor db2 = cpu::column_sums(gc.view({-1, Cout})).to(b2.scalar_type());
  if (B * N == 0) {
    return {dx, at::zeros_like(w1), at::zeros_like(b1), at::zeros_like(w2), db2};
  }
  const Bands bands(hidden, x.device());
  const int64_t hmax = bands.bands.back().hi;
  // the bands write their slices of the weight gradients; units past the widest width get 0
  at::Tensor dw1 = at::empty(w1.sizes(), w1.options()), db1 = at::empty(b1.sizes(), b1.options());
  at::Tensor dw2 = at::empty(w2.sizes(), w2.options());
  if (hmax < H) {
    dw1.narrow(0, hmax, H - hmax).zero_();
    db1.narrow(0, hmax, H - hmax).zero_();
    dw2.narrow(1, hmax, H - hmax).zero_();
  }
  const at::Tensor xs = bands.rows(x.contiguous()), gs = bands.rows(gc);
  // dpre of every band, rows in perm order (with one band: dpre itself, contiguous)
  at::Tensor dpre_all = at::empty({B * N, hmax}, x.options());
  for (const auto& band : bands.bands) {
    const int64_t rows = band.n * N, u = band.hi - band.lo;
    const at::Tensor xr = xs.narrow(0, 0, rows), gr = gs.narrow(0, 0, rows);
    // pre, then GELU(pre) in place once dpre is out of it
    at::Tensor act = linear_low_precision(xr, w1.narrow(0, band.lo, u), b1.narrow(0, band.lo, u));
    at::Tensor dpre = dpre_all.narrow(0, 0, rows).narrow(1, band.lo, u);
    const at::Tensor db1b =
        cpu::gelu_backward_lowp_(mm_low_precision(gr, w2.narrow(1, band.lo, u)), act, dpre);
    db1.narrow(0, band.lo, u).copy_(db1b);  // rounded once
    // (ATen's GEMM, not oneDNN's matmul: it has no one-thread band, see cpu::gemm_row_chunks)
    at::Tensor dw1b = dw1.narrow(0, band.lo, u), dw2b = dw2.narrow(1, band.lo, u);
    mm_low_precision_out(dw1b, dpre.t(), xr);
    mm_low_precision_out(dw2b, gr.t(), act);
  }
  at::Tensor dxs = bands.rows_out(dx);
  for (size_t i = 0; i < bands.bands.size(); ++i) {  // one GEMM per distinct width
    const int64_t n_next = i + 1 < bands.bands.size() ? bands.bands[i + 1].n : 0;
    const int64_t r0 = n_next * N, rows = (bands.bands[i].n - n_next) * N;
    const int64_t h = bands.bands[i].hi;  // the width of samples [n_next, n) in perm order
    // a narrower width's columns as a contiguous copy: ATen's bfloat16 / float16 GEMM on a
    // row-major A whose rows are longer than their view reads up to a tile past each row's
    // end (times zero padding, so a NaN or inf there would reach the product)
    const at::Tensor dpre = dpre_all.narrow(0, r0, rows).narrow(1, 0, h);
    at::Tensor d = dxs.narrow(0, r0, rows);
    mm_low_precision_out(d, h < hmax ? dpre.contiguous() : dpre, w1.narrow(0, 0, h));
  }
  bands.scatter(dx, dxs);
  return {dx, dw1, db1, dw2, db2};
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
  if (native_low_precision_bwd(x, grad_out))
    return ffn_bwd_low_precision(grad_out, x, w1, b1, w2, b2, hidden);
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
