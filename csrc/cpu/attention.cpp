// Block-masked (group-causal) attention on the CPU, forward and backward.
//
// Computes out = softmax(scale * rope(q) rope(k)^T + mask) v and lse (natural log, float32),
// exactly the semantics of adaperceiver/ops/reference.py (attention_forward/backward).
// Schedule: one work item per (batch, head, tile of BM query rows), spread over threads with
// at::parallel_for. Because row_end is nondecreasing, the tile's last row has the largest key
// bound kend = min(row_end[m1 - 1], len): keys >= kend are never read (masked tiles skipped);
// keys < min(row_end[m0], len) are seen by every row (no mask); only the band between them gets
// the per-row bound, and only rows of a tile that crosses a group boundary have such a band.
// Keys are taken in chunks with an online softmax across chunks; keys (rotated by RoPE when
// given) and values of a (batch, head) are converted once into per-thread scratch that its
// tiles reuse.
// Two forward kernels on that schedule:
//  * float32 inside (float32 inputs; bfloat16 / float16 where the 16-bit products cannot run):
//    chunks of up to KC keys, each two small GEMMs on raw pointers (cpu/microkernel.cpp: an
//    AVX-512 register-tiled kernel, BLAS sgemm_ elsewhere; no tensor allocation or dispatch in
//    the inner loop). Scores are kept transposed (key-major) so the softmax runs across the
//    tile's queries with plain vector loads. 16-bit inputs are read in place and converted as
//    rows are loaded, outputs rounded once.
//  * bfloat16 / float16 in 16 bits (attention_fwd_tiles, below): chunks of up to KT keys, the
//    two products on the 16-bit values with float32 accumulation through torch's
//    at::native::cpublas::brgemm (oneDNN's ukernel: AMX tiles where the CPU has them for the
//    dtype, else AVX512-BF16 dot products for bfloat16), the softmax in float32, P rounded to
//    the input type as SDPA rounds it. Taken when lowp_attention_why_not says nothing (the CPU
//    has the instructions for the dtype, ADAPERCEIVER_CPU_ISA is unset or amx, oneDNN enabled);
//    every head size and length fits (odd head dims and chunk tails are padded), so no shape
//    falls back.
// Rows past seq_lens[b] are written as zeros, lse -inf. Packed rows (attention_varlen_fwd: q, k,
// v (R, H, D), samples one after another, no padding) run the same forwards with per-sample row
// bases; there a sample has no rows past its length to write.
// NaN and inf follow the reference: the running max is NaN-sticky, exp keeps NaN and gives 0
// for -inf, a row that is all -inf so far subtracts 0 (so a later chunk can still give it a
// finite max), lse is +-inf where logsumexp is, and a non-finite scale multiplies the scores
// rather than q. Rows past a sample's length are zeros (the reference's are 0 * their scores,
// NaN when k is), and value rows a tile never reads cannot reach it; in a band chunk, rows that
// stop before a non-finite value row are redone from the values they see (BandGuard, shared by
// both forwards; only band chunks scan the values).
// Backward: one work item per (batch, head) (dk/dv are sums over query tiles), same skipping,
// P recomputed from the saved lse, dS = P (dP - delta) with delta = rowsum(dO * O). Two kernels:
//  * float32 inside (float32 inputs; bfloat16 / float16 where the 16-bit products cannot run,
//    those converted up front): products through the same small_gemm (K and V transposed once per
//    (batch, head) so every right operand is row-major).
//  * bfloat16 / float16 in 16 bits (attention_bwd_tiles, under the same lowp_attention_why_not
//    as the forward): the five products (S, dP, dQ, dK^T, dV^T) on the 16-bit values through brgemm
//    with float32 accumulation, P and dS rounded to the input type as the reference in that
//    type rounds them, dK/dV accumulated in float32 across query tiles and rounded once. The
//    packed (varlen) op's backward runs this padded one (ops/attention.py).
#include "common.h"
#include "kernels.h"
#include "cpu/microkernel.h"
#include "cpu/vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include <immintrin.h>

namespace adaperceiver {
namespace cpu {
namespace {

constexpr int64_t BM = 32;   // query rows per work item: the released grans are multiples of 32
constexpr int64_t KC = 512;  // keys per softmax chunk: a BM x KC score block stays in L2
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// float32 contiguous (B, H, N, D) version of x, rotated by RoPE when tables are given
// (interleaved pairs (x[2i], x[2i+1]) times e^(j angle); sign = -1 rotates back, which is the
// gradient of the rotation). No copy when x is already float32, contiguous and not rotated.
// One row of interleaved pairs (half of them) rotated by the angles of (c, s) times sign into
// dst: sign = -1 rotates back (the gradient of the rotation). Both backwards undo RoPE with it.
inline void rotate_row(const float* x, const float* c, const float* s, int64_t half, float sign,
                       float* dst) {
  for (int64_t i = 0; i < half; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1], cs = c[i], sn = sign * s[i];
    dst[2 * i] = x0 * cs - x1 * sn;
    dst[2 * i + 1] = x0 * sn + x1 * cs;
  }
}

at::Tensor prep(const at::Tensor& x, const OptT& cos, const OptT& sin, float sign = 1.f) {
  at::Tensor xf = x.to(at::kFloat).contiguous();
  if (!cos.has_value()) return xf;
  at::Tensor out = at::empty_like(xf);
  const int64_t N = xf.size(2), D = xf.size(3), rows = xf.numel() / std::max<int64_t>(D, 1);
  at::Tensor c = cos->contiguous(), s = sin->contiguous();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r % N;
      const float* xr = xp + r * D;
      float* o = op + r * D;
      rotate_row(xr, cp + n * (D / 2), sp + n * (D / 2), D / 2, sign, o);
    }
  });
  return out;
}

inline int64_t clamp_len(const std::vector<int64_t>& lens, int64_t b, int64_t n) {
  if (lens.empty()) return n;
  return std::min<int64_t>(std::max<int64_t>(lens[b], 0), n);
}

// RoPE tables (cos, sin), each (N, D/2) float32 contiguous, or nullptrs for no rotation
struct Rope {
  const float* cos = nullptr;
  const float* sin = nullptr;
};

// The kernel's view of (cos, sin) tables: contiguous copies kept in keep_cos / keep_sin (which
// must outlive the Rope), or no rotation when the tables are not given.
Rope rope_tables(const OptT& cos, const OptT& sin, at::Tensor& keep_cos, at::Tensor& keep_sin) {
  if (!cos.has_value()) return Rope{};
  keep_cos = cos->contiguous(), keep_sin = sin->contiguous();
  return Rope{keep_cos.data_ptr<float>(), keep_sin.data_ptr<float>()};
}

// Rotate the interleaved pairs of one row x (D values) by position n into dst (D contiguous
// values), times mul; vectorised (vec_math.h).
inline void rope_row(const float* x, const Rope& r, int64_t n, int64_t D, float mul, float* dst) {
  rope_row_contiguous(x, r.cos + n * (D / 2), r.sin + n * (D / 2), D / 2, mul, dst);
}

// Prefetch one row of D values (a cache line per 64 bytes). In the model q and k are heads-last
// views of the projections' (B, N, H * D) outputs, so consecutive tokens' rows of one head are
// H * D values apart, a stride the hardware prefetchers do not follow.
template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(p + d);
}
constexpr int64_t kAhead = 8;  // rows prefetched ahead of the one being rotated

// Where each sample's rows of q, k or v (element type T) are (unit stride along D): row n of
// head h of sample b is at p + base[b] + h * sh + n * sn. Padded (B, H, N, D) tensors (any
// strides, for instance heads-last projections seen as (B, H, N, D)) have base[b] = b *
// stride(0); packed rows (varlen: (R, H, D), sample b's rows from start[b]) have base[b] =
// start[b] * stride(0).
template <typename T>
struct Rows {
  const T* p;
  int64_t sh, sn;
  std::vector<int64_t> base;
};

template <typename T>
Rows<T> padded_rows(const at::Tensor& x) {  // (B, H, N, D)
  Rows<T> r{x.data_ptr<T>(), x.stride(1), x.stride(2), std::vector<int64_t>(x.size(0))};
  for (int64_t b = 0; b < x.size(0); ++b) r.base[b] = b * x.stride(0);
  return r;
}

template <typename T>
Rows<T> packed_rows(const at::Tensor& x, const std::vector<int64_t>& start) {  // (R, H, D)
  Rows<T> r{x.data_ptr<T>(), x.stride(1), x.stride(0), std::vector<int64_t>(start.size())};
  for (size_t b = 0; b < start.size(); ++b) r.base[b] = start[b] * x.stride(0);
  return r;
}

// The forward's problem: sizes (Nq, Nk: the longest sample), inputs, and where the output goes.
// The output is heads-last: row r of sample b, head h at out + ((out_row[b] + r) * H + h) * Dv,
// out_row[b] = b * Nq (padded: rows past the sample's length are written as zeros) or start[b]
// (packed: a sample has no rows past its length). lse is (B, H, Nq) in both layouts.
template <typename T>
struct FwdProblem {
  int64_t B, H, Nq, Nk, D, Dv;
  Rows<T> q, k, v;
  std::vector<int64_t> out_row;
  bool packed;
};

// One work item: query rows [m0, m0 + BM) of (batch b, head h). Rows [0, rows) read keys
// [0, kend) (those < kfull every one of them); the others (past the sample's length, or seeing
// no key) are written by start_tile: zeros and lse -inf, or, packed, only lse (past a sample's
// length are the next sample's rows).
template <typename T>
struct Tile {
  int64_t bh, b, h, m0, rows, kend, kfull, lk;
  T* out;      // row r at out + r * H * Dv (heads-last)
  float* lse;  // row r at lse[r]
};

template <typename T>
Tile<T> start_tile(const FwdProblem<T>& pr, const std::vector<int64_t>& re,
                   const std::vector<int64_t>& lens, int64_t bm, int64_t item, T* op,
                   float* lp) {
  const int64_t nqt = (pr.Nq + bm - 1) / bm, H = pr.H, Dv = pr.Dv;
  const int64_t bh = item / nqt, t = item % nqt, b = bh / H;
  const int64_t m0 = t * bm, mend = std::min(m0 + bm, pr.Nq);
  const int64_t lq = clamp_len(lens, b, pr.Nq), lk = clamp_len(lens, b, pr.Nk);
  const int64_t m1 = std::min(mend, lq);
  T* orow = op + ((pr.out_row[b] + m0) * H + bh % H) * Dv;
  float* lrow = lp + bh * pr.Nq + m0;
  const int64_t kend = m1 > m0 ? std::min(re[m1 - 1], lk) : 0;
  const int64_t rows = kend > 0 ? m1 - m0 : 0;
  for (int64_t r = rows; r < mend - m0; ++r) {
    if (!pr.packed || m0 + r < lq) std::fill(orow + r * H * Dv, orow + r * H * Dv + Dv, T(0));
    lrow[r] = kNegInf;
  }
  const int64_t kfull = rows > 0 ? std::min(re[m0], lk) : 0;
  return Tile<T>{bh, b, bh % H, m0, rows, kend, kfull, lk, orow, lrow};
}

// Keys of chunk [c0, c0 + kc) that row r of the tile sees: all of them below kfull, else its
// own bound (the tile crosses a group boundary).
template <typename T>
inline int64_t keys_seen(const Tile<T>& t, const std::vector<int64_t>& re, int64_t r, int64_t c0,
                         int64_t kc) {
  if (c0 + kc <= t.kfull) return kc;
  return std::clamp<int64_t>(std::min(re[t.m0 + r], t.lk) - c0, 0, kc);
}

// The tile's output rows O / l (O: rows x Dv, ld ldo, float32), rounded once, and lse.
template <typename T>
void finish_tile(const Tile<T>& t, int64_t H, int64_t Dv, const float* O, int64_t ldo,
                 const float* m, const float* l) {
  for (int64_t r = 0; r < t.rows; ++r) {
    // a row whose scores are all -inf has l = 0: inv = inf and 0 * inf = NaN, the
    // reference's softmax of an all -inf row
    const float inv = 1.f / l[r];
    const float* o = O + r * ldo;
    T* dst = t.out + r * H * Dv;
    if constexpr (std::is_same_v<T, float>) {
      scale_row(dst, o, inv, Dv);
    } else {
      scale_row_lowp(std::is_same_v<T, c10::BFloat16>, o, inv, Dv,
                     reinterpret_cast<uint16_t*>(dst));
    }
    // logsumexp's value: +-inf when the max is (an all -inf row; a +inf score, whose
    // softmax is NaN), NaN when a score is NaN (m is NaN-sticky), else m + log(sum)
    t.lse[r] = std::isinf(m[r]) ? m[r] : m[r] + std::log(l[r]);
  }
}

// The band's guard against 0 * NaN, shared by both forwards. In a chunk where some rows of the
// tile stop before its last keys (the tile crosses a group boundary), a row's weights past its
// keys are 0, but the tile product still multiplies them by every value row of the chunk, and 0
// times a NaN or inf value is NaN. Rows that stop at or before the chunk's last non-finite value
// row are redone from the values they see, as the reference sums only the pairs a row reads:
// their O kept before the product (keep), restored after it and the keys they see added row by
// row (redo). Only band chunks are scanned, and only the value rows that some row of the tile
// does not see (from the chunk's end down to the smallest seen[r]): a tile that no group
// boundary crosses never scans.
class BandGuard {
 public:
  BandGuard() = default;  // not a band chunk: nothing to guard
  // seen[r]: the keys row r sees of the chunk's kc (r < rows); bad(j): value row j of the chunk
  // holds a NaN or an infinity
  template <typename Bad>
  BandGuard(const int64_t* seen, int64_t rows, int64_t kc, Bad&& bad) : seen_(seen), rows_(rows) {
    const int64_t lo = *std::min_element(seen, seen + rows);
    for (int64_t j = kc - 1; j >= lo; --j) {
      if (bad(j)) {
        last_bad_ = j;
        break;
      }
    }
  }
  // before the product: the O rows (ld Dv) to redo, into kept
  void keep(const float* O, int64_t Dv, float* kept) const {
    for (int64_t r = 0; r < rows_ && last_bad_ >= 0; ++r)
      if (seen_[r] <= last_bad_) std::copy_n(O + r * Dv, Dv, kept + r * Dv);
  }
  // after it: those rows back to kept (zeros when the product did not accumulate) plus
  // sum over j < seen[r] of weight(r, j) * value(j)[d] (value(j): row j of the chunk)
  template <typename Weight, typename Value>
  void redo(float* O, const float* kept, int64_t Dv, bool accumulated, Weight&& weight,
            Value&& value) const {
    for (int64_t r = 0; r < rows_ && last_bad_ >= 0; ++r) {
      if (seen_[r] > last_bad_) continue;
      float* o = O + r * Dv;
      if (accumulated) std::copy_n(kept + r * Dv, Dv, o);
      else std::fill_n(o, Dv, 0.f);
      for (int64_t j = 0; j < seen_[r]; ++j) {
        const float p = weight(r, j);
        const auto* vr = value(j);
        for (int64_t d = 0; d < Dv; ++d) o[d] += p * static_cast<float>(vr[d]);
      }
    }
  }

 private:
  const int64_t* seen_ = nullptr;
  int64_t rows_ = 0, last_bad_ = -1;
};

// The inputs are read in place in their dtype T (float32, bfloat16 or float16) and converted to
// float32 as they are loaded: q into the transposed tile (rotated by RoPE when given, times
// the scale); k (rotated) and, unless float32, v once per (batch, head) into per-thread scratch
// rows that the head's query tiles reuse. So no converted or rotated copy of the inputs is
// written, and the products and the softmax run in float32 whatever T is.
template <typename T>
void attention_fwd_kernel(const FwdProblem<T>& pr, Rope qrope, Rope krope,
                          const std::vector<int64_t>& re, const std::vector<int64_t>& lens,
                          float scale, T* op, float* lp) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t B = pr.B, H = pr.H, Nq = pr.Nq, D = pr.D, Nk = pr.Nk, Dv = pr.Dv;
  const int64_t nqt = (Nq + BM - 1) / BM;
  const int64_t qsh = pr.q.sh, qsn = pr.q.sn, ksh = pr.k.sh, ksn = pr.k.sn;
  const int64_t vsh = pr.v.sh, vsn = pr.v.sn;
  const T* qp = pr.q.p;
  const T* kp = pr.k.p;
  const T* vp = pr.v.p;
  const int64_t kc_max = std::min<int64_t>(KC, std::max<int64_t>(Nk, 1));
  // The scale is folded into q (one multiply per query element instead of per score). A NaN
  // or infinite scale is applied to the scores instead, as the reference does ((q k^T) *
  // scale): folded in, inf * q would sum +inf and -inf terms into NaN where the reference has
  // +-inf scores, whose softmax and lse (+inf) differ.
  const bool post_scale = !std::isfinite(scale);
  const float qmul = post_scale ? 1.f : scale;
  const bool k_scratch = krope.cos != nullptr || !kF32, v_scratch = !kF32;

  at::parallel_for(0, B * H * nqt, 1, [&](int64_t begin, int64_t end) {
    // per-thread scratch, allocated once per range of work items (not per item).
    // The scores are kept transposed, st[key][query], so that the softmax runs across the
    // queries of the tile with plain vector loops and P V reads st in place.
    std::vector<float> qt(D * BM), st(kc_max * BM), O(BM * Dv), m(BM), l(BM), mx(BM),
        sum(BM), kr(k_scratch ? Nk * D : 0), vr(v_scratch ? Nk * Dv : 0), qrow(D), raw(D),
        keep(BM * Dv);
    std::vector<int64_t> seen(BM);  // keys each row sees in the current chunk (the band)
    // float32 (rotated) keys and values of one (batch, head), kept across its query tiles (a
    // thread's items are consecutive, so the tiles of a head follow each other): keys
    // [0, k_done) and values [0, v_done) of head cur_bh are in kr / vr; each tile converts
    // only the rows past that
    int64_t cur_bh = -1, k_done = 0, v_done = 0;
    for (int64_t item = begin; item < end; ++item) {
      const Tile<T> tile = start_tile(pr, re, lens, BM, item, op, lp);
      const int64_t rows = tile.rows, kend = tile.kend, m0 = tile.m0, b = tile.b;
      if (rows == 0) continue;
      const int64_t bh = tile.bh, h = tile.h;
      const T* q = qp + pr.q.base[b] + h * qsh + m0 * qsn;
      const T* kb = kp + pr.k.base[b] + h * ksh;
      const T* vb = vp + pr.v.base[b] + h * vsh;
      if (cur_bh != bh) cur_bh = bh, k_done = 0, v_done = 0;
      for (int64_t r = 0; r < rows; ++r) {
        if (r + kAhead < rows) prefetch_row(q + (r + kAhead) * qsn, D);
        const float* qr = float_row(q + r * qsn, D, raw.data());
        if (qrope.cos) {  // rotate (vectorised) into a row, then into column r of the tile
          rope_row(qr, qrope, m0 + r, D, qmul, qrow.data());
          for (int64_t d = 0; d < D; ++d) qt[d * BM + r] = qrow[d];
        } else {
          for (int64_t d = 0; d < D; ++d) qt[d * BM + r] = qmul * qr[d];
        }
      }
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t c0 = 0; c0 < kend; c0 += KC) {
        const int64_t kc = std::min(KC, kend - c0);
        // st (kc x rows) = K[c0:c0+kc] (scale Q)^T
        const float* kchunk;
        int64_t krs = D;
        if (k_scratch) {  // float32 (rotated) keys of this chunk, once per (batch, head)
          for (int64_t j = k_done; j < c0 + kc; ++j) {
            if (j + kAhead < kend) prefetch_row(kb + (j + kAhead) * ksn, D);
            if (krope.cos) {
              rope_row(float_row(kb + j * ksn, D, raw.data()), krope, j, D, 1.f,
                       kr.data() + j * D);
            } else {
              to_float_row(kb + j * ksn, D, kr.data() + j * D);
            }
          }
          k_done = std::max(k_done, c0 + kc);
          kchunk = kr.data() + c0 * D;
        } else {
          kchunk = reinterpret_cast<const float*>(kb) + c0 * ksn;  // float32: T is float
          krs = ksn;
        }
        small_gemm(kc, rows, D, kchunk, krs, 1, qt.data(), BM, st.data(), BM, false);
        if (post_scale) {
          for (int64_t j = 0; j < kc; ++j)
            for (int64_t r = 0; r < rows; ++r) st[j * BM + r] *= scale;
        }
        const bool band = c0 + kc > tile.kfull;
        if (band) {
          // the band: keys some rows of the tile may not see (tile crosses a group boundary)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t vc = seen[r] = keys_seen(tile, re, r, c0, kc);
            for (int64_t j = vc; j < kc; ++j) st[j * BM + r] = kNegInf;
          }
        }
        col_softmax(st.data(), kc, BM, rows, m.data(), mx.data(), sum.data());
        for (int64_t r = 0; r < rows; ++r) {
          const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - mx[r]);
          if (c0 > 0 && alpha != 1.f) {
            float* o = O.data() + r * Dv;
            for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
          }
          l[r] = l[r] * alpha + sum[r];
          m[r] = mx[r];
        }
        // O (+)= P V[c0:c0+kc], P read from st as a column-major (rows x kc) matrix
        const float* vchunk;
        int64_t vrs = Dv;
        if (v_scratch) {  // float32 values of this chunk, once per (batch, head)
          for (int64_t j = v_done; j < c0 + kc; ++j) to_float_row(vb + j * vsn, Dv, vr.data() + j * Dv);
          v_done = std::max(v_done, c0 + kc);
          vchunk = vr.data() + c0 * Dv;
        } else {
          vchunk = reinterpret_cast<const float*>(vb) + c0 * vsn;  // float32: T is float
          vrs = vsn;
        }
        const BandGuard guard = band ? BandGuard(seen.data(), rows, kc, [&](int64_t j) {
          const float* x = vchunk + j * vrs;
          for (int64_t d = 0; d < Dv; ++d)
            if (!std::isfinite(x[d])) return true;
          return false;
        }) : BandGuard();
        guard.keep(O.data(), Dv, keep.data());
        small_gemm(rows, Dv, kc, st.data(), 1, BM, vchunk, vrs, O.data(), Dv, c0 > 0);
        guard.redo(O.data(), keep.data(), Dv, c0 > 0,
                   [&](int64_t r, int64_t j) { return st[j * BM + r]; },
                   [&](int64_t j) { return vchunk + j * vrs; });
      }
      finish_tile(tile, H, Dv, O.data(), Dv, m.data(), l.data());
    }
  });
}

// ---- bfloat16 / float16 in 16 bits (at::native::cpublas::brgemm, oneDNN's ukernel: AMX tiles
// or AVX512-BF16 dot products) ----
// The same tiles as above; the two products run on the 16-bit inputs with float32 accumulation:
// S (rows x kw) = Qt Kp, with Qt the tile's (rotated) queries, row-major, and Kp the head's
// keys transposed into the VNNI layout (pairs of head-dim values interleaved) in blocks of KT
// keys; then the softmax on float32 rows (scale applied to the scores, as the reference does),
// P rounded to T as SDPA rounds it, and O (+)= P Vp with Vp the head's values in VNNI layout
// (pairs of keys interleaved). Chunk widths are rounded up to KALIGN keys: the extra scores are
// never read, their weights are 0 and their value rows are zeros (so a value row past kend,
// even NaN, cannot reach the tile), and the brgemm kernels (generated and cached per shape by
// torch) come in a bounded set of shapes. An odd head dimension is padded with a zero.
// query rows per work item: twice the float32 kernel's, since each brgemm call has a fixed cost
// and 64 rows halve the calls (benchmarks/README.md has the figures)
constexpr int64_t TM = 64;
constexpr int64_t KT = 256;     // keys per chunk (the S block, TM x KT float32, is 64 KiB)
constexpr int64_t KALIGN = 32;  // chunk widths rounded up to this (two AMX tile columns)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether a row of n 16-bit values (bfloat16: exponent mask 0x7F80, float16: 0x7C00) holds a
// NaN or an infinity: all exponent bits set. AVX-512 BW, 32 values a step (the 16-bit products
// run only where the CPU has it: every CPU with AMX, and bf16_dot_products asks for it).
__attribute__((target("avx512f,avx512bw"))) inline bool nonfinite_row(const uint16_t* x,
                                                                        int64_t n,
                                                                        uint16_t exp_mask) {
  const __m512i m = _mm512_set1_epi16(static_cast<short>(exp_mask));
  __mmask32 bad = 0;
  for (int64_t d = 0; d < n; d += 32) {
    const __mmask32 k = lanes32_below(n, d);
    const __m512i v = _mm512_maskz_loadu_epi16(k, x + d);
    bad |= _mm512_mask_cmpeq_epi16_mask(k, _mm512_and_si512(v, m), m);
  }
  return bad != 0;
}

// Row x of T (n values) into dst (n values of T), rotated by RoPE at position pos when r has
// tables (in float32, rounded once: one vectorised pass, rope_row_lowp), else copied.
template <typename T>
inline void lowp_row(const T* x, const Rope& r, int64_t pos, int64_t n, T* dst) {
  if (r.cos) {
    rope_row_lowp(std::is_same_v<T, c10::BFloat16>, reinterpret_cast<const uint16_t*>(x),
                  r.cos + pos * (n / 2), r.sin + pos * (n / 2), n / 2, 1.f,
                  reinterpret_cast<uint16_t*>(dst));
  } else {
    std::copy(x, x + n, dst);
  }
}

// Keys [j0, j0 + nj) of one (batch, head) (rows of kb, stride ksn; nj <= 16) as 16-bit row
// pointers for pack_pairs_transposed, into src: a key below kend as it is, or rotated by RoPE
// (or padded to Dp) into row j of scratch (16 x Dp); a key at or past kend points at zero (a
// row of Dp zeros; null when every key is below kend). Prefetches kAhead rows ahead, below
// kend. Both tile kernels pack keys so.
template <typename T>
inline void key_rows(const T* kb, int64_t ksn, const Rope& krope, int64_t j0, int64_t nj,
                     int64_t kend, int64_t D, int64_t Dp, T* scratch, const T* zero,
                     const uint16_t** src) {
  for (int64_t j = 0; j < nj; ++j) {
    const int64_t key = j0 + j;
    const T* x = key < kend ? kb + key * ksn : zero;
    if (key < kend) {
      if (key + kAhead < kend) prefetch_row(x + kAhead * ksn, D);
      if (krope.cos || D != Dp) {  // rotated (or padded) into scratch row j
        lowp_row(x, krope, key, D, scratch + j * Dp);
        x = scratch + j * Dp;
      }
    }
    src[j] = reinterpret_cast<const uint16_t*>(x);
  }
}

template <typename T>
void attention_fwd_tiles(const FwdProblem<T>& pr, Rope qrope, Rope krope,
                         const std::vector<int64_t>& re, const std::vector<int64_t>& lens,
                         float scale, T* op, float* lp) {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const int64_t B = pr.B, H = pr.H, Nq = pr.Nq, D = pr.D, Nk = pr.Nk, Dv = pr.Dv;
  const int64_t Dp = round_up(D, 2), nk_pad = round_up(std::max<int64_t>(Nk, 1), KT);
  const int64_t nqt = (Nq + TM - 1) / TM;
  const int64_t qsn = pr.q.sn, ksn = pr.k.sn, vsn = pr.v.sn;

  at::parallel_for(0, B * H * nqt, 1, [&](int64_t begin, int64_t end) {
    // per-thread scratch (once per range of work items): the query tile, the head's packed
    // keys and values (kept across its query tiles, as in the float32 kernel: keys [0, k_done)
    // and values [0, v_done) of head cur_bh are packed, values [v_done, round_up(v_done,
    // KALIGN)) are zeros), scores, weights and the float32 accumulators
    std::vector<T> qt(TM * Dp, T(0)), kp(nk_pad * Dp, T(0)), vp(nk_pad * Dv, T(0)),
        pt(TM * KT), krows(16 * Dp, T(0)), vzero(Dv, T(0));
    std::vector<float> st(TM * KT), O(TM * Dv), m(TM), l(TM), keep(TM * Dv);
    std::vector<int64_t> seen(TM);  // the keys row r sees in the current chunk
    const uint16_t exp_mask = kBf16 ? 0x7F80 : 0x7C00;
    int64_t cur_bh = -1, k_done = 0, v_done = 0;
    for (int64_t item = begin; item < end; ++item) {
      const Tile<T> tile = start_tile(pr, re, lens, TM, item, op, lp);
      const int64_t rows = tile.rows, kend = tile.kend, m0 = tile.m0;
      if (rows == 0) continue;
      const T* q = pr.q.p + pr.q.base[tile.b] + tile.h * pr.q.sh + m0 * qsn;
      const T* kb = pr.k.p + pr.k.base[tile.b] + tile.h * pr.k.sh;
      const T* vb = pr.v.p + pr.v.base[tile.b] + tile.h * pr.v.sh;
      if (cur_bh != tile.bh) cur_bh = tile.bh, k_done = 0, v_done = 0;
      for (int64_t r = 0; r < rows; ++r) {  // Qt: rows x Dp, row-major (pad column stays 0)
        if (r + kAhead < rows) prefetch_row(q + (r + kAhead) * qsn, D);
        lowp_row(q + r * qsn, qrope, m0 + r, D, qt.data() + r * Dp);
      }
      // keys [k_done, kend), up to 16 at a time (within one block of KT): their pairs (d, d+1)
      // transposed to the keys' columns of the block's VNNI K^T
      for (int64_t j0 = k_done; j0 < kend;) {
        const int64_t nj = std::min({int64_t(16), kend - j0, KT - j0 % KT});
        const uint16_t* src[16];
        key_rows(kb, ksn, krope, j0, nj, kend, D, Dp, krows.data(), static_cast<const T*>(nullptr),
                 src);
        pack_pairs_transposed(src, nj, Dp / 2,
                              reinterpret_cast<uint16_t*>(kp.data() + (j0 / KT) * Dp * KT +
                                                          (j0 % KT) * 2), KT);
        j0 += nj;
      }
      k_done = std::max(k_done, kend);
      // values: pair rows (keys 2p, 2p + 1) from v_done's pair to round_up(kend, KALIGN): keys
      // past kend, which this tile's last chunk reads with weight 0, are zeros
      if (kend > v_done) {
        const auto* zeros = reinterpret_cast<const uint16_t*>(vzero.data());
        for (int64_t j = v_done & ~int64_t(1); j < round_up(kend, KALIGN); j += 2) {
          if (j + kAhead < kend) prefetch_row(vb + (j + kAhead) * vsn, Dv);
          const auto* a = j < kend ? reinterpret_cast<const uint16_t*>(vb + j * vsn) : zeros;
          const auto* b = j + 1 < kend ? reinterpret_cast<const uint16_t*>(vb + (j + 1) * vsn)
                                       : nullptr;
          interleave_pair(a, b, Dv, reinterpret_cast<uint16_t*>(vp.data() + j * Dv));
        }
        v_done = kend;
      }
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t c0 = 0; c0 < kend; c0 += KT) {
        const int64_t kc = std::min(KT, kend - c0), kw = round_up(kc, KALIGN);
        at::native::cpublas::brgemm(rows, kw, Dp, Dp, KT, KT, false, qt.data(),
                                    kp.data() + (c0 / KT) * Dp * KT, st.data(), true);
        for (int64_t r = 0; r < rows; ++r) {
          float mn;
          seen[r] = keys_seen(tile, re, r, c0, kc);
          const float sum = softmax_row_lowp(kBf16, st.data() + r * KT, seen[r], kw, scale, m[r],
                                             &mn, reinterpret_cast<uint16_t*>(pt.data() + r * KT));
          const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - mn);
          if (c0 > 0 && alpha != 1.f) {
            float* o = O.data() + r * Dv;
            for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mn;
        }
        const BandGuard guard = c0 + kc > tile.kfull
                                    ? BandGuard(seen.data(), rows, kc, [&](int64_t j) {
                                        return nonfinite_row(reinterpret_cast<const uint16_t*>(
                                                                 vb + (c0 + j) * vsn),
                                                             Dv, exp_mask);
                                      })
                                    : BandGuard();
        guard.keep(O.data(), Dv, keep.data());
        at::native::cpublas::brgemm(rows, Dv, kw, KT, Dv, Dv, c0 > 0, pt.data(),
                                    vp.data() + c0 * Dv, O.data(), true);
        guard.redo(O.data(), keep.data(), Dv, c0 > 0,
                   [&](int64_t r, int64_t j) { return static_cast<float>(pt[r * KT + j]); },
                   [&](int64_t j) { return vb + (c0 + j) * vsn; });
      }
      finish_tile(tile, H, Dv, O.data(), Dv, m.data(), l.data());
    }
    at::native::cpublas::brgemm_release(true);  // hand the tile state back
  });
}

// Runs the forward in 16 bits for bfloat16 / float16 when lowp_attention_why_not says nothing,
// else the float32 kernel.
template <typename T>
void attention_fwd_dispatch(const FwdProblem<T>& pr, Rope qrope, Rope krope,
                            const std::vector<int64_t>& re, const std::vector<int64_t>& lens,
                            float scale, T* op, float* lp) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    if (lowp_attention_why_not(c10::CppTypeToScalarType<T>::value, pr.D, pr.Dv).empty()) {
      return attention_fwd_tiles<T>(pr, qrope, krope, re, lens, scale, op, lp);
    }
  }
  attention_fwd_kernel<T>(pr, qrope, krope, re, lens, scale, op, lp);
}

void attention_bwd_kernel(const at::Tensor& gof, const at::Tensor& qf, const at::Tensor& kf,
                          const at::Tensor& vf, const at::Tensor& of, const at::Tensor& lsef,
                          const std::vector<int64_t>& re, const std::vector<int64_t>& lens,
                          float scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = qf.size(0), H = qf.size(1), Nq = qf.size(2), D = qf.size(3);
  const int64_t Nk = kf.size(2), Dv = vf.size(3);
  const float* gp = gof.data_ptr<float>();
  const float* qp = qf.data_ptr<float>();
  const float* kp = kf.data_ptr<float>();
  const float* vp = vf.data_ptr<float>();
  const float* opp = of.data_ptr<float>();
  const float* lp = lsef.data_ptr<float>();
  float* dqp = dq.data_ptr<float>();  // float32 work buffers (RoPE is undone afterwards)
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const int64_t kc_max = std::min<int64_t>(KC, std::max<int64_t>(Nk, 1));

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // per-thread scratch: P and dP of one (tile, chunk), and K^T, V^T of one (b, h) so that
    // every product is a small_gemm with a row-major right operand (no BLAS call overhead)
    std::vector<float> P(BM * kc_max), dP(BM * kc_max), delta(BM), kt(D * Nk), vt(Dv * Nk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const int64_t lq = clamp_len(lens, b, Nq), lk = clamp_len(lens, b, Nk);
      float* dqb = dqp + bh * Nq * D;
      float* dkb = dkp + bh * Nk * D;
      float* dvb = dvp + bh * Nk * Dv;
      std::fill(dqb, dqb + Nq * D, 0.f);
      std::fill(dkb, dkb + Nk * D, 0.f);
      std::fill(dvb, dvb + Nk * Dv, 0.f);
      const float* kb = kp + bh * Nk * D;
      const float* vb = vp + bh * Nk * Dv;
      const int64_t kmax = lq > 0 ? std::min(re[lq - 1], lk) : 0;  // keys any row reads
      for (int64_t j = 0; j < kmax; ++j) {
        for (int64_t d = 0; d < D; ++d) kt[d * Nk + j] = kb[j * D + d];
        for (int64_t d = 0; d < Dv; ++d) vt[d * Nk + j] = vb[j * Dv + d];
      }
      for (int64_t m0 = 0; m0 < lq; m0 += BM) {
        const int64_t m1 = std::min(m0 + BM, lq);
        const int64_t kend = std::min(re[m1 - 1], lk);
        if (kend <= 0) continue;
        const int64_t rows = m1 - m0, kfull = std::min(re[m0], lk);
        const float* q = qp + (bh * Nq + m0) * D;
        const float* go = gp + (bh * Nq + m0) * Dv;
        const float* o = opp + (bh * Nq + m0) * Dv;
        const float* ls = lp + bh * Nq + m0;
        for (int64_t r = 0; r < rows; ++r) {
          // delta_i = sum_j P_ij dP_ij = dO_i . O_i
          delta[r] = dot(go + r * Dv, o + r * Dv, Dv);
        }
        for (int64_t c0 = 0; c0 < kend; c0 += KC) {
          const int64_t kc = std::min(KC, kend - c0);
          // S = Q K^T (scaled below), dP = dO V^T: (rows x kc), row-major, ld kc
          small_gemm(rows, kc, D, q, D, 1, kt.data() + c0, Nk, P.data(), kc, false);
          small_gemm(rows, kc, Dv, go, Dv, 1, vt.data() + c0, Nk, dP.data(), kc, false);
          for (int64_t r = 0; r < rows; ++r) {
            float* p = P.data() + r * kc;
            float* dp = dP.data() + r * kc;
            const int64_t vc = c0 + kc <= kfull
                                   ? kc
                                   : std::clamp<int64_t>(std::min(re[m0 + r], lk) - c0, 0, kc);
            for (int64_t j = 0; j < vc; ++j) p[j] *= scale;
            // a row whose lse is +inf holds a +inf score: its softmax is NaN everywhere (as
            // the reference's), where exp(s - lse) would give NaN only at that score
            const float lse_r = ls[r] == std::numeric_limits<float>::infinity()
                                    ? std::numeric_limits<float>::quiet_NaN()
                                    : ls[r];
            row_softmax_grad(p, dp, vc, lse_r, delta[r], scale);
            std::fill(p + vc, p + kc, 0.f);
            std::fill(dp + vc, dp + kc, 0.f);
          }
          // dV[c0:] += P^T dO ; dK[c0:] += dS^T Q ; dQ += dS K[c0:]
          small_gemm(kc, Dv, rows, P.data(), 1, kc, go, Dv, dvb + c0 * Dv, Dv, true);
          small_gemm(kc, D, rows, dP.data(), 1, kc, q, D, dkb + c0 * D, D, true);
          small_gemm(rows, D, kc, dP.data(), kc, 1, kb + c0 * D, D, dqb + m0 * D, D, true);
        }
      }
    }
  });
}


// ---- backward of bfloat16 / float16 in 16 bits (the products through cpublas::brgemm) ----
// One work item per (batch, head) (dK and dV are sums over its query tiles). The head's keys
// are packed once, in T: K^T in VNNI blocks of KT keys (pairs of head-dim values, as the
// forward's, for S = Q K^T), K in VNNI pairs of keys (for dQ = dS K) and V^T in VNNI blocks
// (for dP = dO V^T); keys past the last one a row reads, up to a multiple of KALIGN, are zeros.
// Per query tile of TM rows: Q (rotated) and dO row-major and transposed, and delta = rowsum(dO
// * O) in float32. Per chunk of KT keys: S and dP on the tiles (float32), then row by row P =
// exp(scale S - lse) and dS = P (dP - delta) scale in float32 with the forward's mask (a row's
// keys past the ones it sees get P = dS = 0), both rounded to T as the reference in T rounds
// them; dQ (+)= dS K into the tile's float32 rows; dK^T (+)= Q^T dS and dV^T (+)= dO^T P into
// the head's float32 accumulators, transposed so that P and dS enter as right operands in VNNI
// pairs of query rows (two rows interleaved, no transpose of the TM x KT blocks). Each gradient
// is rounded once, after RoPE is undone in float32 as the float32 backward undoes it. Rows past
// a sample's length get zero dq, keys no row reads zero dk and dv. A NaN or inf in q, k, v or dO
// may reach the gradients of its (batch, head) at pairs a row does not read (0 times it in a
// tile product), never another head's.
template <typename T>
struct BwdProblem {
  int64_t B, H, Nq, Nk, D, Dv;
  Rows<T> q, k, v, go, o;  // go, o: the upstream gradient and the forward's output, as q
};

// x (n float32 values) rotated back by RoPE at position pos when r has tables (the opposite
// angle: the gradient of the rotation), rounded once to T into dst; buf: n floats of scratch.
template <typename T>
inline void unrotate_round_row(const float* x, const Rope& r, int64_t pos, int64_t n, float* buf,
                               T* dst) {
  if (r.cos) {
    rotate_row(x, r.cos + pos * (n / 2), r.sin + pos * (n / 2), n / 2, -1.f, buf);
    x = buf;
  }
  scale_row_lowp(std::is_same_v<T, c10::BFloat16>, x, 1.f, n, reinterpret_cast<uint16_t*>(dst));
}

template <typename T>
void attention_bwd_tiles(const BwdProblem<T>& pr, Rope qrope, Rope krope, const float* lse,
                         const std::vector<int64_t>& re, const std::vector<int64_t>& lens,
                         float scale, T* dq, T* dk, T* dv) {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const int64_t B = pr.B, H = pr.H, Nq = pr.Nq, Nk = pr.Nk, D = pr.D, Dv = pr.Dv;
  const int64_t Dp = round_up(D, 2), Dvp = round_up(Dv, 2);
  const int64_t nk_pad = round_up(std::max<int64_t>(Nk, 1), KT), W = std::max(Dp, Dvp);
  // the row stride of the transposed float32 accumulators dK^T, dV^T: 16 floats past a
  // multiple of KT keys, so that a column (one key's gradient) is not 4 KiB-aligned rows that
  // share one L1 set
  const int64_t ldt = nk_pad + 16;
  auto bits = [](auto* p) {  // a 16-bit T pointer as its bits, const kept
    using E = std::remove_pointer_t<decltype(p)>;
    return reinterpret_cast<std::conditional_t<std::is_const_v<E>, const uint16_t, uint16_t>*>(p);
  };

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // per-thread scratch: the head's packed keys and values, the tile's rows (pad columns and
    // the pad row of the transposed ones stay 0), the chunk's blocks, the float32 accumulators
    std::vector<T> kt(nk_pad * Dp, T(0)), kv(nk_pad * Dp, T(0)), vt(nk_pad * Dvp, T(0)),
        kscr(16 * Dp, T(0)), vscr(16 * Dvp, T(0)), zero(W, T(0)), qrow(TM * Dp, T(0)),
        qtr(Dp * TM, T(0)), grow(TM * Dvp, T(0)), gtr(Dv * TM, T(0)), p16(TM * KT),
        ds16(TM * KT), pv(TM * KT), dsv(TM * KT);
    std::vector<float> s(TM * KT), dp(TM * KT), dqacc(TM * Dp), dkt(Dp * ldt), dvt(Dv * ldt),
        delta(TM), lser(TM), f0(W), kblock(16 * W);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t lq = clamp_len(lens, b, Nq), lk = clamp_len(lens, b, Nk);
      const int64_t kmax = lq > 0 ? std::min(re[lq - 1], lk) : 0;  // keys any row reads
      const int64_t kpad = round_up(kmax, KALIGN);
      const T* qb = pr.q.p + pr.q.base[b] + h * pr.q.sh;
      const T* kb = pr.k.p + pr.k.base[b] + h * pr.k.sh;
      const T* vb = pr.v.p + pr.v.base[b] + h * pr.v.sh;
      const T* gb = pr.go.p + pr.go.base[b] + h * pr.go.sh;
      const T* ob = pr.o.p + pr.o.base[b] + h * pr.o.sh;
      const float* lb = lse + bh * Nq;
      T* dqb = dq + bh * Nq * D;
      T* dkb = dk + bh * Nk * D;
      T* dvb = dv + bh * Nk * Dv;
      // keys [0, kpad), 16 at a time (within one block of KT; kpad and KT are multiples of 16)
      for (int64_t j0 = 0; j0 < kpad; j0 += 16) {
        const uint16_t *ks[16], *vs[16];
        key_rows(kb, pr.k.sn, krope, j0, 16, kmax, D, Dp, kscr.data(), zero.data(), ks);
        for (int64_t j = 0; j < 16; ++j) {  // values: as they are (or padded to Dvp), zeros
          const int64_t key = j0 + j;       // past kmax
          if (key >= kmax) {
            vs[j] = bits(zero.data());
            continue;
          }
          const T* y = vb + key * pr.v.sn;
          if (Dv != Dvp) {
            std::copy_n(y, Dv, vscr.data() + j * Dvp);
            y = vscr.data() + j * Dvp;
          }
          vs[j] = bits(y);
        }
        pack_pairs_transposed(ks, 16, Dp / 2, bits(kt.data() + (j0 / KT) * Dp * KT + (j0 % KT) * 2),
                              KT);
        pack_pairs_transposed(vs, 16, Dvp / 2,
                              bits(vt.data() + (j0 / KT) * Dvp * KT + (j0 % KT) * 2), KT);
        for (int64_t j = 0; j < 16; j += 2)
          interleave_pair(ks[j], ks[j + 1], Dp, bits(kv.data() + (j0 + j) * Dp));
      }
      for (int64_t d = 0; d < Dp; ++d) std::fill_n(dkt.data() + d * ldt, kpad, 0.f);
      for (int64_t d = 0; d < Dv; ++d) std::fill_n(dvt.data() + d * ldt, kpad, 0.f);

      for (int64_t m0 = 0; m0 < lq; m0 += TM) {
        const int64_t m1 = std::min(m0 + TM, lq), rows = m1 - m0;
        const int64_t kend = std::min(re[m1 - 1], lk), kfull = std::min(re[m0], lk);
        if (kend <= 0) {
          std::fill(dqb + m0 * D, dqb + m1 * D, T(0));
          continue;
        }
        const int64_t rows_p = round_up(rows, 2);
        for (int64_t r = 0; r < rows; ++r) {
          const T* x = qb + (m0 + r) * pr.q.sn;
          if (r + kAhead < rows) {  // (out is heads-last: rows H * Dv apart, as q's may be)
            prefetch_row(x + kAhead * pr.q.sn, D);
            prefetch_row(gb + (m0 + r + kAhead) * pr.go.sn, Dv);
            prefetch_row(ob + (m0 + r + kAhead) * pr.o.sn, Dv);
          }
          T* qr = qrow.data() + r * Dp;
          lowp_row(x, qrope, m0 + r, D, qr);
          for (int64_t d = 0; d < D; ++d) qtr[d * TM + r] = qr[d];
          const T* g = gb + (m0 + r) * pr.go.sn;
          T* gr = grow.data() + r * Dvp;
          std::copy_n(g, Dv, gr);
          for (int64_t d = 0; d < Dv; ++d) gtr[d * TM + r] = gr[d];
          // delta_r = sum_j P_rj dP_rj = dO_r . O_r
          to_float_row(g, Dv, f0.data());
          to_float_row(ob + (m0 + r) * pr.o.sn, Dv, kblock.data());
          delta[r] = dot(f0.data(), kblock.data(), Dv);
          // a row whose lse is +inf holds a +inf score: its softmax is NaN everywhere (as the
          // reference's), where exp(s - lse) would give NaN only at that score
          lser[r] = lb[m0 + r] == std::numeric_limits<float>::infinity()
                        ? std::numeric_limits<float>::quiet_NaN()
                        : lb[m0 + r];
        }
        if (rows_p != rows) {  // the pad row of the transposed Q and dO (K of the products)
          for (int64_t d = 0; d < D; ++d) qtr[d * TM + rows] = T(0);
          for (int64_t d = 0; d < Dv; ++d) gtr[d * TM + rows] = T(0);
        }
        for (int64_t c0 = 0; c0 < kend; c0 += KT) {
          const int64_t kc = std::min(KT, kend - c0), kw = round_up(kc, KALIGN);
          at::native::cpublas::brgemm(rows, kw, Dp, Dp, KT, KT, false, qrow.data(),
                                      kt.data() + (c0 / KT) * Dp * KT, s.data(), true);
          at::native::cpublas::brgemm(rows, kw, Dvp, Dvp, KT, KT, false, grow.data(),
                                      vt.data() + (c0 / KT) * Dvp * KT, dp.data(), true);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t vc = c0 + kc <= kfull
                                   ? kc
                                   : std::clamp<int64_t>(std::min(re[m0 + r], lk) - c0, 0, kc);
            softmax_grad_row_lowp(kBf16, s.data() + r * KT, dp.data() + r * KT, vc, kw, scale,
                                  lser[r], delta[r], bits(p16.data() + r * KT),
                                  bits(ds16.data() + r * KT));
          }
          for (int64_t r = 0; r < rows; r += 2) {  // pairs of rows (an odd last one with 0s)
            const bool two = r + 1 < rows;
            interleave_pair(bits(p16.data() + r * KT), two ? bits(p16.data() + (r + 1) * KT)
                                                           : nullptr, kw, bits(pv.data() + r * KT));
            interleave_pair(bits(ds16.data() + r * KT), two ? bits(ds16.data() + (r + 1) * KT)
                                                            : nullptr, kw, bits(dsv.data() + r * KT));
          }
          // dQ (+)= dS K[c0:]; dV^T[:, c0:] += dO^T P; dK^T[:, c0:] += Q^T dS
          at::native::cpublas::brgemm(rows, Dp, kw, KT, Dp, Dp, c0 > 0, ds16.data(),
                                      kv.data() + c0 * Dp, dqacc.data(), true);
          at::native::cpublas::brgemm(Dv, kw, rows_p, TM, KT, ldt, true, gtr.data(),
                                      pv.data(), dvt.data() + c0, true);
          at::native::cpublas::brgemm(D, kw, rows_p, TM, KT, ldt, true, qtr.data(),
                                      dsv.data(), dkt.data() + c0, true);
        }
        for (int64_t r = 0; r < rows; ++r)
          unrotate_round_row(dqacc.data() + r * Dp, qrope, m0 + r, D, f0.data(),
                             dqb + (m0 + r) * D);
      }
      std::fill(dqb + lq * D, dqb + Nq * D, T(0));  // rows past the sample's length
      // dk, dv rows of keys [j0, j0 + 16): the block of columns of dK^T (dV^T) transposed
      // into kblock (read along rows), then each row rotated back and rounded
      for (int64_t j0 = 0; j0 < kmax; j0 += 16) {
        const int64_t nj = std::min<int64_t>(16, kmax - j0);
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < nj; ++j) kblock[j * W + d] = dkt[d * ldt + j0 + j];
        for (int64_t j = 0; j < nj; ++j)
          unrotate_round_row(kblock.data() + j * W, krope, j0 + j, D, f0.data(),
                             dkb + (j0 + j) * D);
        for (int64_t d = 0; d < Dv; ++d)
          for (int64_t j = 0; j < nj; ++j) kblock[j * W + d] = dvt[d * ldt + j0 + j];
        for (int64_t j = 0; j < nj; ++j)
          scale_row_lowp(kBf16, kblock.data() + j * W, 1.f, Dv, bits(dvb + (j0 + j) * Dv));
      }
      std::fill(dkb + kmax * D, dkb + Nk * D, T(0));  // keys no row reads
      std::fill(dvb + kmax * Dv, dvb + Nk * Dv, T(0));
    }
    at::native::cpublas::brgemm_release(true);  // hand the tile state back
  });
}

// ADAPERCEIVER_CPU_ISA as set, empty when unset: the reasons below name it where it turned a
// 16-bit path off.
std::string isa_env() {
  const char* env = std::getenv("ADAPERCEIVER_CPU_ISA");
  return env ? env : "";
}

}  // namespace

std::string tiles_why_not(at::ScalarType dtype, int64_t D, int64_t Dv) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    return std::string(c10::toString(dtype)) + " inputs compute in float32 (AMX multiplies only "
           "bfloat16 / float16)";
  }
  if (!amx_tiles()) {
    const std::string env = isa_env();
    return !env.empty() ? "ADAPERCEIVER_CPU_ISA=" + env + " turns the AMX tiles off"
                        : std::string("this CPU has no AMX tiles") +
                              (dtype == at::kHalf ? " (float16's 16-bit products need AMX-FP16)"
                                                  : "");
  }
  if (!at::globalContext().userEnabledMkldnn()) {
    return "torch.backends.mkldnn is disabled (the tiles run through oneDNN's brgemm)";
  }
  const bool native = dtype == at::kBFloat16 ? native_bf16_gemm() : native_fp16_gemm();
  if (!native || !at::native::cpublas::could_pack(dtype)) {
    return std::string("cpublas cannot put ") + c10::toString(dtype) + " on AMX tiles here (" +
           (dtype == at::kHalf ? "no AMX-FP16" : "no AMX-BF16") + ")";
  }
  if (D == 0 || Dv == 0) return "an empty head dimension";
  return "";
}

namespace {

// Whether torch's cpublas::brgemm multiplies T (bfloat16 / float16) here, on the AMX tiles or
// the AVX512-BF16 dot products that oneDNN's ukernel generates: one 2 x 16 x 32 product of small
// integers, exact in T and float32, checked against its value once per process and type. A
// torch built without the ukernel, or oneDNN capped below the instructions
// (ONEDNN_MAX_CPU_ISA), throws or refuses instead; either way the reason is returned and the
// attention computes in float32.
template <typename T>
std::string brgemm_probe() {
  constexpr int64_t M = 2, N = 16, K = 32;
  std::vector<T> a(M * K), bv(K * N);
  std::vector<float> c(M * N, -1.f), want(M * N, 0.f);
  auto av = [](int64_t i, int64_t p) { return float((i * 7 + p) % 5 - 2); };
  auto bval = [](int64_t p, int64_t n) { return float((p * 3 + n) % 7 - 3); };
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t p = 0; p < K; ++p) a[i * K + p] = T(av(i, p));
  }
  // VNNI layout: the pair (p, p + 1) of column n at ((p / 2) * N + n) * 2 + p % 2
  for (int64_t p = 0; p < K; ++p) {
    for (int64_t n = 0; n < N; ++n) bv[((p / 2) * N + n) * 2 + p % 2] = T(bval(p, n));
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t p = 0; p < K; ++p) want[i * N + n] += av(i, p) * bval(p, n);
    }
  }
  const std::string name = c10::toString(c10::CppTypeToScalarType<T>::value);
  try {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), bv.data(), c.data(), true);
    at::native::cpublas::brgemm_release(true);
  } catch (const c10::Error& e) {
    return "torch's cpublas::brgemm does not take " + name + " here: " +
           e.what_without_backtrace();
  } catch (const std::exception& e) {
    return "torch's cpublas::brgemm does not take " + name + " here: " + e.what();
  }
  return c == want ? "" : "torch's cpublas::brgemm gave a wrong " + name + " product here";
}

const std::string& brgemm_why_not(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) {
    static const std::string bf16 = brgemm_probe<c10::BFloat16>();
    return bf16;
  }
  static const std::string fp16 = brgemm_probe<c10::Half>();
  return fp16;
}

// Why bfloat16's products do not run on AVX512-BF16 dot products here (the conditions before
// the probe).
std::string bf16_dots_why_not(int64_t D, int64_t Dv) {
  if (!bf16_dot_products()) {
    const std::string env = isa_env();
    return !env.empty() ? "ADAPERCEIVER_CPU_ISA=" + env +
                              " turns the AMX tiles and the AVX512-BF16 products off"
                        : "this CPU has neither AMX-BF16 tiles nor AVX512-BF16 dot products";
  }
  if (!at::globalContext().userEnabledMkldnn()) {
    return "torch.backends.mkldnn is disabled (the AVX512-BF16 products run through oneDNN's "
           "brgemm)";
  }
  if (D == 0 || Dv == 0) return "an empty head dimension";
  return "";
}

}  // namespace

std::string lowp_attention_why_not(at::ScalarType dtype, int64_t D, int64_t Dv) {
  std::string why = tiles_why_not(dtype, D, Dv);
  if (!why.empty() && dtype == at::kBFloat16) why = bf16_dots_why_not(D, Dv);
  return why.empty() ? brgemm_why_not(dtype) : why;
}

const char* attention_path(at::ScalarType dtype) {
  // the probe included: where it refuses, the attention computes in float32 even with the tiles
  if (!lowp_attention_why_not(dtype, 64, 64).empty()) return "float32";
  return tiles_why_not(dtype, 64, 64).empty() ? "amx" : "avx512-bf16";
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(ADAPERCEIVER_ATTENTION_FWD_PARAMS) {
  check_attention_args(q, k, v, token_grans, q_cos, q_sin, k_cos, k_sin);
  TORCH_CHECK(q.device().is_cpu(), "attention_fwd (CPU kernel) got tensors on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2);
  const auto re = row_end(Nq, token_grans, Nk);
  const auto lens = seq_lens_host(seq_lens, B);
  // read in place (any dtype, any strides but D's, which must be 1) and rotated as loaded
  auto unit_d = [](const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); };
  const at::Tensor qf = unit_d(q), kf = unit_d(k), vf = unit_d(v);
  at::Tensor qc, qs, kc, ks;
  const Rope qrope = rope_tables(q_cos, q_sin, qc, qs), krope = rope_tables(k_cos, k_sin, kc, ks);
  // written heads-last and returned as its (B, H, Nq, Dv) view: the op hands the buffer to
  // the model as (B, Nq, C) with no transpose copy
  at::Tensor out = at::empty({B, Nq, H, v.size(3)}, q.options());
  at::Tensor lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  std::vector<int64_t> out_row(B);
  for (int64_t b = 0; b < B; ++b) out_row[b] = b * Nq;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd",
                                  [&] {
                                    const FwdProblem<scalar_t> pr{
                                        B, H, Nq, Nk, q.size(3), v.size(3),
                                        padded_rows<scalar_t>(qf), padded_rows<scalar_t>(kf),
                                        padded_rows<scalar_t>(vf), out_row, false};
                                    attention_fwd_dispatch<scalar_t>(
                                        pr, qrope, krope, re, lens, static_cast<float>(scale),
                                        out.data_ptr<scalar_t>(), lse.data_ptr<float>());
                                  });
  return {out.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(
    ADAPERCEIVER_ATTENTION_VARLEN_FWD_PARAMS) {
  const VarlenRows rows = check_varlen_args(q, k, v, seq_lens, token_grans, q_cos, q_sin, k_cos,
                                            k_sin);
  TORCH_CHECK(q.device().is_cpu(), "attention_varlen_fwd (CPU kernel) got tensors on ",
              q.device());
  const int64_t B = static_cast<int64_t>(rows.lens.size()), R = q.size(0), H = q.size(1);
  const int64_t D = q.size(2), Nmax = rows.max_len;
  // (checked above: (Nmax, D/2) float32 on q's device)
  at::Tensor qc, qs, kc, ks;
  const Rope qrope = rope_tables(q_cos, q_sin, qc, qs), krope = rope_tables(k_cos, k_sin, kc, ks);
  auto unit_d = [](const at::Tensor& x) { return x.stride(2) == 1 ? x : x.contiguous(); };
  const at::Tensor qf = unit_d(q), kf = unit_d(k), vf = unit_d(v);
  const auto re = row_end(Nmax, token_grans, Nmax);
  at::Tensor out = at::empty({R, H, v.size(2)}, q.options());
  at::Tensor lse = at::empty({B, H, Nmax}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "attention_varlen_fwd", [&] {
                                    const FwdProblem<scalar_t> pr{
                                        B, H, Nmax, Nmax, D, v.size(2),
                                        packed_rows<scalar_t>(qf, rows.start),
                                        packed_rows<scalar_t>(kf, rows.start),
                                        packed_rows<scalar_t>(vf, rows.start), rows.start, true};
                                    attention_fwd_dispatch<scalar_t>(
                                        pr, qrope, krope, re, rows.lens,
                                        static_cast<float>(scale), out.data_ptr<scalar_t>(),
                                        lse.data_ptr<float>());
                                  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(ADAPERCEIVER_ATTENTION_BWD_PARAMS) {
  check_attention_args(q, k, v, token_grans, q_cos, q_sin, k_cos, k_sin);
  TORCH_CHECK(q.device().is_cpu(), "attention_bwd (CPU kernel) got tensors on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), Dv = v.size(3);
  check_attention_bwd_args(grad_out, out, lse, q, v);
  const auto re = row_end(Nq, token_grans, Nk);
  const auto lens = seq_lens_host(seq_lens, B);
  const at::ScalarType dtype = q.scalar_type();
  if ((dtype == at::kBFloat16 || dtype == at::kHalf) &&
      lowp_attention_why_not(dtype, q.size(3), Dv).empty()) {
    // the 16-bit inputs read in place (any strides but the head dim's, which must be 1)
    auto unit_d = [](const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); };
    const at::Tensor qu = unit_d(q), ku = unit_d(k), vu = unit_d(v),
                     gu = unit_d(grad_out.to(dtype)), ou = unit_d(out.to(dtype)),
                     lsef = lse.to(at::kFloat).contiguous();
    at::Tensor qc, qs, kc, ks;
    const Rope qrope = rope_tables(q_cos, q_sin, qc, qs);
    const Rope krope = rope_tables(k_cos, k_sin, kc, ks);
    at::Tensor dq = at::empty({B, H, Nq, q.size(3)}, q.options());
    at::Tensor dk = at::empty({B, H, Nk, k.size(3)}, k.options());
    at::Tensor dv = at::empty({B, H, Nk, Dv}, v.options());
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "attention_bwd_tiles", [&] {
      const BwdProblem<scalar_t> pr{B, H, Nq, Nk, q.size(3), Dv,
                                    padded_rows<scalar_t>(qu), padded_rows<scalar_t>(ku),
                                    padded_rows<scalar_t>(vu), padded_rows<scalar_t>(gu),
                                    padded_rows<scalar_t>(ou)};
      attention_bwd_tiles<scalar_t>(pr, qrope, krope, lsef.data_ptr<float>(), re, lens,
                                    static_cast<float>(scale), dq.data_ptr<scalar_t>(),
                                    dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
    });
    return {dq, dk, dv};
  }
  at::Tensor qf = prep(q, q_cos, q_sin), kf = prep(k, k_cos, k_sin), vf = prep(v, {}, {});
  at::Tensor gof = prep(grad_out, {}, {}), of = prep(out, {}, {});
  at::Tensor lsef = lse.to(at::kFloat).contiguous();
  at::Tensor dq = at::empty(qf.sizes(), qf.options()), dk = at::empty(kf.sizes(), kf.options());
  at::Tensor dv = at::empty(vf.sizes(), vf.options());
  attention_bwd_kernel(gof, qf, kf, vf, of, lsef, re, lens, static_cast<float>(scale), dq, dk,
                       dv);
  // gradients wrt the unrotated q, k: rotate back by the opposite angle
  if (q_cos.has_value()) dq = prep(dq, q_cos, q_sin, -1.f);
  if (k_cos.has_value()) dk = prep(dk, k_cos, k_sin, -1.f);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace cpu
}  // namespace adaperceiver
