// Block-masked (group-causal) attention on CUDA: a tiled flash-style forward and a two-kernel
// backward, fp16/bf16/fp32 inputs with fp32 accumulation, compiled for sm_80 and sm_90.
//
// Forward schedule: one thread block per (batch * head, query tile of BM = 64 rows): grid.x is
// batch * head (up to 2^31 - 1), grid.y the query tile (launch.h). Each query row is held by
// D / 32 adjacent lanes of one warp (a "row group"), each lane holding 32 of the row's dims
// (its rotated, scaled q and its output accumulator) in registers: 64 floats per thread at any
// head_dim, so nothing spills; a score is the group's partial dot products summed by warp
// shuffles. Key/value tiles of BN = 32 rows are staged in shared memory as fp32.
// RoPE: K arrives rotated by the rope_rows pre-pass (once per key row per call, rounded to the
// input dtype as the reference rounds it), not once per query tile that reads it; q is rotated
// on load, once per row. The forward kernel never sees K's tables.
// Skipped: key tiles at or past kend = min(row_end[last row of the tile], len) are never loaded;
// tiles below min(row_end[first row], len) need no per-row test; in between each row stops at its
// own bound. Online softmax per row. Rows past seq_lens[b] write zeros and lse = -inf.
// Packed rows (attention_varlen_fwd: q, k, v, out (R, H, D), samples one after another) run the
// same kernels from each sample's first row; a sample has no rows past its length to write.
// Backward (kept simple, no atomics, fp32): kernel 1, one row group per query row, computes dq;
// kernel 2, one row group per key row, computes dk and dv over the query rows that see that key
// (a suffix of the rows, since row_end is nondecreasing). Their inputs come from the same
// pre-pass: q rotated in fp32 (as the forward rotates it on load), k rotated and rounded to the
// input dtype (the values the forward read); dq and dk (w.r.t. the rotated rows) are rotated
// back by the pre-pass with the inverse rotation, straight into the input dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common.h"
#include "convert.h"
#include "index_memo.h"
#include "kernels.h"
#include "launch.h"

namespace adaperceiver {
namespace cuda {
namespace {

constexpr int BM = 64;      // query (or key) rows per block
constexpr int BN = 32;      // key (or query) rows per shared-memory tile
constexpr int kDims = 32;   // head dims held per thread: a row is D / kDims lanes (a row group)

template <int D>
constexpr int row_lanes() { return D / kDims; }

// Lanes [base, base + L) of this warp: the row group of this thread (L divides 32).
template <int L>
__device__ __forceinline__ unsigned group_mask() {
  if (L == 32) return 0xffffffffu;
  const unsigned base = (threadIdx.x & 31u) & ~(unsigned)(L - 1);
  return ((1u << L) - 1u) << base;
}

// x summed over the L lanes of the row group (all of them call it: they share one row, hence
// one trip count).
template <int L>
__device__ __forceinline__ float group_sum(float x, unsigned mask) {
#pragma unroll
  for (int o = L / 2; o > 0; o /= 2) x += __shfl_xor_sync(mask, x, o);
  return x;
}

// Pair i of a lane's dims: lane `part` of a row group owns the interleaved pairs
// part + L * i (dims 2 (part + L i) and +1), so the L lanes read L adjacent float2 of a
// shared-memory row (no bank conflict) and other rows' lanes read the same words (broadcast).
template <int L>
__device__ __forceinline__ float2 pair_of(const float* smem_row, int part, int i) {
  return reinterpret_cast<const float2*>(smem_row)[part + L * i];
}

struct Params {
  const void* q; const void* k; const void* v; void* out; float* lse;
  const int* row_end;  // (Nq,)
  const int* lens;     // (B,) or nullptr
  // packed rows: q, k, v, out (R, H, D) contiguous, sample b's rows from starts[b] (B,);
  // nullptr: padded (B, H, N, D) contiguous
  const int* starts;
  const float* q_cos; const float* q_sin;  // q's RoPE (Nq, D / 2) or nullptr; k is pre-rotated
  int B, H, Nq, Nk;
  float scale;
};

template <typename T, int D>
__global__ void __launch_bounds__(BM * row_lanes<D>()) attn_fwd_kernel(Params p) {
  constexpr int L = row_lanes<D>(), NT = BM * L, PAIRS = kDims / 2;
  __shared__ __align__(16) float ks[BN][D];
  __shared__ __align__(16) float vs[BN][D];
  const int bh = blockIdx.x, b = bh / p.H;
  const int m0 = blockIdx.y * BM, row = m0 + threadIdx.x / L, part = threadIdx.x % L;
  const unsigned mask = group_mask<L>();
  const int len = p.lens ? max(p.lens[b], 0) : 0x7fffffff;
  const int lq = min(p.Nq, len), lk = min(p.Nk, len);
  const int last = min(m0 + BM, lq) - 1;
  const int kend = last >= m0 ? min(p.row_end[last], lk) : 0;
  const bool active = row < lq;
  const int my_end = active ? min(p.row_end[row], lk) : 0;
  // element offsets: row n of head h of sample b at base + h * head + n * step (q, k, v, out)
  const int h = bh % p.H;
  const bool packed = p.starts != nullptr;
  const size_t step = packed ? (size_t)p.H * D : D;
  const size_t qbase = packed ? ((size_t)p.starts[b] * p.H + h) * D : (size_t)bh * p.Nq * D;
  const size_t kbase = packed ? qbase : (size_t)bh * p.Nk * D;
  const T* q = static_cast<const T*>(p.q) + qbase + (size_t)(active ? row : 0) * step;
  const T* kb = static_cast<const T*>(p.k) + kbase;
  const T* vb = static_cast<const T*>(p.v) + kbase;

  float2 qr[PAIRS], acc[PAIRS];
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int pr = part + L * i;
    float x0 = active ? to_f(q[2 * pr]) : 0.f, x1 = active ? to_f(q[2 * pr + 1]) : 0.f;
    if (p.q_cos && active) {
      const float c = p.q_cos[(size_t)row * (D / 2) + pr], s = p.q_sin[(size_t)row * (D / 2) + pr];
      const float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
      x0 = y0;
      x1 = y1;
    }
    qr[i] = make_float2(x0 * p.scale, x1 * p.scale);
    acc[i] = make_float2(0.f, 0.f);
  }
  float m = -INFINITY, l = 0.f;
  for (int t0 = 0; t0 < kend; t0 += BN) {
    // stage K (already rotated) and V of this tile in shared memory as fp32
    for (int e = threadIdx.x; e < BN * D; e += NT) {
      const int j = e / D, d = e % D, key = t0 + j;
      const bool in = key < kend;
      ks[j][d] = in ? to_f(kb[(size_t)key * step + d]) : 0.f;
      vs[j][d] = in ? to_f(vb[(size_t)key * step + d]) : 0.f;
    }
    __syncthreads();
    const int jn = min(BN, my_end - t0);  // this row's keys in the tile (<= 0: none)
    for (int j = 0; j < jn; ++j) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) {
        const float2 kk = pair_of<L>(ks[j], part, i);
        s += qr[i].x * kk.x + qr[i].y * kk.y;
      }
      s = group_sum<L>(s, mask);
      const float mnew = fmaxf(m, s);
      const float alpha = __expf(m - mnew);  // m = -inf on the first key: alpha = 0
      const float pj = __expf(s - mnew);
      l = l * alpha + pj;
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) {
        const float2 vv = pair_of<L>(vs[j], part, i);
        acc[i].x = acc[i].x * alpha + pj * vv.x;
        acc[i].y = acc[i].y * alpha + pj * vv.y;
      }
      m = mnew;
    }
    __syncthreads();
  }
  if (row < p.Nq) {
    const bool seen = my_end > 0;
    // a +inf score makes the row NaN (inf - inf) but its logsumexp +inf, as torch's logsumexp
    // (l is NaN then); NaN stays NaN through l: no guard turns a non-finite value into a number
    if (part == 0)
      p.lse[(size_t)bh * p.Nq + row] = !seen ? -INFINITY : m == INFINITY ? m : m + logf(l);
    // packed: rows past the sample's length are the next sample's (not written)
    if (!packed || active) {
      T* o = static_cast<T*>(p.out) + qbase + (size_t)row * step;
      const float inv = seen ? 1.f / l : 0.f;
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) {
        const int pr = part + L * i;
        o[2 * pr] = from_f<T>(seen ? acc[i].x * inv : 0.f);
        o[2 * pr + 1] = from_f<T>(seen ? acc[i].y * inv : 0.f);
      }
    }
  }
}

// The RoPE pre-pass: out row n = R(n) x row n (sign = +1) or R(n)^T x row n (sign = -1, the
// gradient w.r.t. the unrotated row), computed in fp32, rounded to Round's precision (the
// forward's K: the input dtype, as the reference rounds rope(k)), stored as Out. One thread per
// (row, pair); each row once per call. Rows at or past a sample's length are skipped when lens
// is given (no kernel reads them); without lens every row of (B, H, N, D) is written.
struct RopeParams {
  const void* x; void* out;
  const float* cos; const float* sin;  // (N, D / 2)
  const int* lens;    // (B,) or nullptr
  const int* starts;  // packed (R, H, D) rows from starts[b], or nullptr: padded (B, H, N, D)
  int H, N, D;
  float sign;
};

constexpr int kRopeRows = 32;     // rows per block of the pre-pass
constexpr int kRopeThreads = 256;

template <typename In, typename Out, typename Round>
__global__ void __launch_bounds__(kRopeThreads) rope_rows_kernel(RopeParams p) {
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int n0 = blockIdx.y * kRopeRows, half = p.D / 2;
  const int lim = p.lens ? min(p.N, max(p.lens[b], 0)) : p.N;
  const bool packed = p.starts != nullptr;
  const size_t step = packed ? (size_t)p.H * p.D : p.D;
  const size_t base = packed ? ((size_t)p.starts[b] * p.H + h) * p.D : (size_t)bh * p.N * p.D;
  const In* x = static_cast<const In*>(p.x) + base;
  Out* out = static_cast<Out*>(p.out) + base;
  for (int e = threadIdx.x; e < kRopeRows * half; e += kRopeThreads) {
    const int n = n0 + e / half, i = e % half;
    if (n >= lim) break;  // e grows with n: every later e of this thread is past it too
    const size_t at = (size_t)n * step + 2 * i;
    const float x0 = to_f(x[at]), x1 = to_f(x[at + 1]);
    const float c = p.cos[(size_t)n * half + i], s = p.sign * p.sin[(size_t)n * half + i];
    out[at] = from_f<Out>(to_f(from_f<Round>(x0 * c - x1 * s)));
    out[at + 1] = from_f<Out>(to_f(from_f<Round>(x0 * s + x1 * c)));
  }
}

// A row's lse as the backward uses it: +inf (a +inf score; its forward output is NaN) becomes
// NaN, so that its p, hence its dk and dv, are NaN as in the reference, not exp(x - inf) = 0.
__device__ __forceinline__ float backward_lse(float lse) { return lse == INFINITY ? NAN : lse; }

struct BwdParams {
  const float *q, *k, *v, *go, *lse, *delta;  // fp32, (B, H, N, D) contiguous; q, k rotated
  float *dq, *dk, *dv;                        // fp32 outputs (w.r.t. the rotated q, k)
  const int* row_end;
  const int* lens;
  int B, H, Nq, Nk;
  float scale;
};

// dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j, one row group per query row.
template <int D>
__global__ void __launch_bounds__(BM * row_lanes<D>()) attn_bwd_dq_kernel(BwdParams p) {
  constexpr int L = row_lanes<D>(), NT = BM * L, PAIRS = kDims / 2;
  __shared__ __align__(16) float ks[BN][D];
  __shared__ __align__(16) float vs[BN][D];
  const int bh = blockIdx.x, b = bh / p.H;
  const int m0 = blockIdx.y * BM, row = m0 + threadIdx.x / L, part = threadIdx.x % L;
  const unsigned mask = group_mask<L>();
  const int len = p.lens ? max(p.lens[b], 0) : 0x7fffffff;
  const int lq = min(p.Nq, len), lk = min(p.Nk, len);
  const int last = min(m0 + BM, lq) - 1;
  const int kend = last >= m0 ? min(p.row_end[last], lk) : 0;
  const bool active = row < lq;
  const int my_end = active ? min(p.row_end[row], lk) : 0;
  const float2* qrow = reinterpret_cast<const float2*>(p.q + ((size_t)bh * p.Nq + (active ? row : 0)) * D);
  const float2* grow = reinterpret_cast<const float2*>(p.go + ((size_t)bh * p.Nq + (active ? row : 0)) * D);
  float2 qr[PAIRS], gr[PAIRS], dq[PAIRS];
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int pr = part + L * i;
    qr[i] = active ? qrow[pr] : make_float2(0.f, 0.f);
    gr[i] = active ? grow[pr] : make_float2(0.f, 0.f);
    dq[i] = make_float2(0.f, 0.f);
  }
  const float lse = active ? backward_lse(p.lse[(size_t)bh * p.Nq + row]) : 0.f;
  const float delta = active ? p.delta[(size_t)bh * p.Nq + row] : 0.f;
  const float* kb = p.k + (size_t)bh * p.Nk * D;
  const float* vb = p.v + (size_t)bh * p.Nk * D;
  for (int t0 = 0; t0 < kend; t0 += BN) {
    for (int e = threadIdx.x; e < BN * D; e += NT) {
      const int j = e / D, d = e % D, key = t0 + j;
      ks[j][d] = key < kend ? kb[(size_t)key * D + d] : 0.f;
      vs[j][d] = key < kend ? vb[(size_t)key * D + d] : 0.f;
    }
    __syncthreads();
    const int jn = min(BN, my_end - t0);
    for (int j = 0; j < jn; ++j) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) {
        const float2 kk = pair_of<L>(ks[j], part, i), vv = pair_of<L>(vs[j], part, i);
        s += qr[i].x * kk.x + qr[i].y * kk.y;
        dp += gr[i].x * vv.x + gr[i].y * vv.y;
      }
      s = group_sum<L>(s, mask);
      dp = group_sum<L>(dp, mask);
      const float pj = __expf(s * p.scale - lse);
      const float ds = pj * (dp - delta) * p.scale;
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) {
        const float2 kk = pair_of<L>(ks[j], part, i);
        dq[i].x += ds * kk.x;
        dq[i].y += ds * kk.y;
      }
    }
    __syncthreads();
  }
  if (row < p.Nq) {
    float2* out = reinterpret_cast<float2*>(p.dq + ((size_t)bh * p.Nq + row) * D);
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) out[part + L * i] = active ? dq[i] : make_float2(0.f, 0.f);
  }
}

// dk_j, dv_j over the query rows that see key j: rows i in [first_i(j), lq), one row group per
// key.
template <int D>
__global__ void __launch_bounds__(BM * row_lanes<D>()) attn_bwd_dkv_kernel(BwdParams p) {
  constexpr int L = row_lanes<D>(), NT = BM * L, PAIRS = kDims / 2;
  __shared__ __align__(16) float qs[BN][D];
  __shared__ __align__(16) float gs[BN][D];
  __shared__ float ls[BN], dls[BN];
  __shared__ int res[BN];
  const int bh = blockIdx.x, b = bh / p.H;
  const int n0 = blockIdx.y * BM, key = n0 + threadIdx.x / L, part = threadIdx.x % L;
  const unsigned mask = group_mask<L>();
  const int len = p.lens ? max(p.lens[b], 0) : 0x7fffffff;
  const int lq = min(p.Nq, len), lk = min(p.Nk, len);
  const bool active = key < lk;
  const size_t ko = ((size_t)bh * p.Nk + (active ? key : 0)) * D;
  const float2* krow = reinterpret_cast<const float2*>(p.k + ko);
  const float2* vrow = reinterpret_cast<const float2*>(p.v + ko);
  float2 kr[PAIRS], vr[PAIRS], dk[PAIRS], dv[PAIRS];
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int pr = part + L * i;
    kr[i] = active ? krow[pr] : make_float2(0.f, 0.f);
    vr[i] = active ? vrow[pr] : make_float2(0.f, 0.f);
    dk[i] = make_float2(0.f, 0.f);
    dv[i] = make_float2(0.f, 0.f);
  }
  // first query row that sees key n0 (row_end nondecreasing): binary search
  int lo = 0, hi = lq;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (p.row_end[mid] > n0) hi = mid; else lo = mid + 1;
  }
  const float* qb = p.q + (size_t)bh * p.Nq * D;
  const float* gb = p.go + (size_t)bh * p.Nq * D;
  for (int i0 = lo; i0 < lq; i0 += BN) {
    for (int e = threadIdx.x; e < BN * D; e += NT) {
      const int i = e / D, d = e % D, r = i0 + i;
      qs[i][d] = r < lq ? qb[(size_t)r * D + d] : 0.f;
      gs[i][d] = r < lq ? gb[(size_t)r * D + d] : 0.f;
    }
    for (int i = threadIdx.x; i < BN; i += NT) {
      const int r = i0 + i;
      ls[i] = r < lq ? backward_lse(p.lse[(size_t)bh * p.Nq + r]) : 0.f;
      dls[i] = r < lq ? p.delta[(size_t)bh * p.Nq + r] : 0.f;
      res[i] = r < lq ? min(p.row_end[r], lk) : 0;
    }
    __syncthreads();
    for (int i = 0; i < BN; ++i) {
      // row i0 + i does not see this key (one answer per row group: its lanes share the key)
      if (!active || key >= res[i]) continue;
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int c = 0; c < PAIRS; ++c) {
        const float2 qq = pair_of<L>(qs[i], part, c), gg = pair_of<L>(gs[i], part, c);
        s += qq.x * kr[c].x + qq.y * kr[c].y;
        dp += gg.x * vr[c].x + gg.y * vr[c].y;
      }
      s = group_sum<L>(s, mask);
      dp = group_sum<L>(dp, mask);
      const float pj = __expf(s * p.scale - ls[i]);
      const float ds = pj * (dp - dls[i]) * p.scale;
#pragma unroll
      for (int c = 0; c < PAIRS; ++c) {
        const float2 qq = pair_of<L>(qs[i], part, c), gg = pair_of<L>(gs[i], part, c);
        dv[c].x += pj * gg.x;
        dv[c].y += pj * gg.y;
        dk[c].x += ds * qq.x;
        dk[c].y += ds * qq.y;
      }
    }
    __syncthreads();
  }
  if (key < p.Nk) {
    float2* dko = reinterpret_cast<float2*>(p.dk + ((size_t)bh * p.Nk + key) * D);
    float2* dvo = reinterpret_cast<float2*>(p.dv + ((size_t)bh * p.Nk + key) * D);
#pragma unroll
    for (int c = 0; c < PAIRS; ++c) {
      dko[part + L * c] = dk[c];
      dvo[part + L * c] = dv[c];
    }
  }
}

void check_cuda_args(const at::Tensor& q, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "the CUDA kernels got tensors on ", q.device());
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "head_dim=", D,
              " is not supported by the CUDA kernels; allowed: 32, 64, 128");
  TORCH_CHECK(v.size(3) == D, "the CUDA kernels need v's head_dim (", v.size(3),
              ") equal to q's (", D, ")");
}

// row_end on dev, built once per (Nq, grans, Nk) value (index_memo.h)
at::Tensor row_end_device(int64_t Nq, at::OptionalIntArrayRef grans, int64_t Nk,
                          const at::Device& dev) {
  const auto re = row_end(Nq, grans, Nk);
  return device_ints(std::vector<int32_t>(re.begin(), re.end()), dev);
}

// seq_lens as contiguous int32 on dev (undefined when None); checked without reading it; a
// host tensor's values go over once per value (index_memo.h)
at::Tensor seq_lens_device(const c10::optional<at::Tensor>& seq_lens, int64_t B,
                           const at::Device& dev) {
  check_seq_lens(seq_lens, B);
  if (!seq_lens.has_value()) return at::Tensor();
  if (seq_lens->is_cpu()) {
    const at::Tensor h = seq_lens->to(at::kInt).contiguous();
    const int32_t* v = h.data_ptr<int32_t>();
    return device_ints(std::vector<int32_t>(v, v + h.numel()), dev);
  }
  return seq_lens->to(dev, at::kInt).contiguous();
}

// (batch * head, row tiles of rows_per_block) as a dim3; TORCH_CHECK names the limit a launch
// would exceed
dim3 grid_of(int64_t batch_heads, int64_t rows, int64_t rows_per_block = BM) {
  Grid2 g{0, 0};
  try {
    g = attention_grid(batch_heads, rows, rows_per_block);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, "the CUDA attention kernels cannot launch: ", e.what());
  }
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y));
}

// t (fp32, contiguous) at an 8-byte aligned address: the backward kernels read and write rows
// as float2. A contiguous view may start at an odd float (a storage offset); it is copied then.
at::Tensor float2_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % alignof(float2) == 0 ? t : t.clone();
}

const float* table_ptr(const OptT& t) { return t ? t->data_ptr<float>() : nullptr; }

// The tables as the kernels read them: contiguous float32 (check_rope_tables checked the rest).
OptT contiguous_table(const OptT& t) { return t ? OptT(t->contiguous()) : OptT(); }

// The rope_rows pre-pass over x (contiguous, padded (B, H, N, D) or packed (R, H, D) with
// starts) into a new tensor of dtype out_t, rounding to round_t; sign -1: the inverse rotation.
// lens: rows past a sample's length are left unwritten (nullptr: every row is written).
at::Tensor rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     int64_t B, int64_t H, int64_t N, const int* lens, const int* starts,
                     at::ScalarType out_t, at::ScalarType round_t, float sign) {
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_t));
  const dim3 grid = grid_of(B * H, N, kRopeRows);
  if (grid.x == 0 || grid.y == 0) return out;
  RopeParams p{x.data_ptr(), out.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(),
               lens, starts, (int)H, (int)N, (int)x.size(-1), sign};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto in_t = x.scalar_type();
  const auto bad = [&]() {
    TORCH_CHECK(false, "rope_rows: no instance for ", in_t, " -> ", out_t, " (rounded to ",
                round_t, ")");
  };
  // the instances the ops use: the forward's K (T -> T), the backward's q (T -> fp32) and k
  // (T -> fp32 rounded to T), its gradients back (fp32 -> T)
  if (in_t == out_t && out_t == round_t) {
    switch (in_t) {
      case at::kHalf: rope_rows_kernel<__half, __half, __half><<<grid, kRopeThreads, 0, stream>>>(p); break;
      case at::kBFloat16: rope_rows_kernel<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16><<<grid, kRopeThreads, 0, stream>>>(p); break;
      case at::kFloat: rope_rows_kernel<float, float, float><<<grid, kRopeThreads, 0, stream>>>(p); break;
      default: bad();
    }
  } else if (out_t == at::kFloat && (round_t == at::kFloat || round_t == in_t)) {
    const bool round = round_t != at::kFloat;
    switch (in_t) {
      case at::kHalf:
        if (round) rope_rows_kernel<__half, float, __half><<<grid, kRopeThreads, 0, stream>>>(p);
        else rope_rows_kernel<__half, float, float><<<grid, kRopeThreads, 0, stream>>>(p);
        break;
      case at::kBFloat16:
        if (round) rope_rows_kernel<__nv_bfloat16, float, __nv_bfloat16><<<grid, kRopeThreads, 0, stream>>>(p);
        else rope_rows_kernel<__nv_bfloat16, float, float><<<grid, kRopeThreads, 0, stream>>>(p);
        break;
      default: bad();  // fp32 -> fp32 is the first branch
    }
  } else if (in_t == at::kFloat && round_t == at::kFloat) {
    switch (out_t) {
      case at::kHalf: rope_rows_kernel<float, __half, float><<<grid, kRopeThreads, 0, stream>>>(p); break;
      case at::kBFloat16: rope_rows_kernel<float, __nv_bfloat16, float><<<grid, kRopeThreads, 0, stream>>>(p); break;
      default: bad();
    }
  } else {
    bad();
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <int D>
void launch_fwd(const Params& p, at::ScalarType t, cudaStream_t stream) {
  const dim3 grid = grid_of((int64_t)p.B * p.H, p.Nq);
  if (grid.x == 0 || grid.y == 0) return;
  constexpr int threads = BM * row_lanes<D>();
  switch (t) {
    case at::kHalf: attn_fwd_kernel<__half, D><<<grid, threads, 0, stream>>>(p); break;
    case at::kBFloat16: attn_fwd_kernel<__nv_bfloat16, D><<<grid, threads, 0, stream>>>(p); break;
    case at::kFloat: attn_fwd_kernel<float, D><<<grid, threads, 0, stream>>>(p); break;
    default: TORCH_CHECK(false, "the CUDA attention forward has no kernel for ", t);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D>
void launch_bwd(const BwdParams& p, cudaStream_t stream) {
  const int64_t bh = (int64_t)p.B * p.H;
  const dim3 grid_q = grid_of(bh, p.Nq), grid_k = grid_of(bh, p.Nk);
  constexpr int threads = BM * row_lanes<D>();
  if (grid_q.x > 0) {
    attn_bwd_dq_kernel<D><<<grid_q, threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (grid_k.x > 0) {
    attn_bwd_dkv_kernel<D><<<grid_k, threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The forward on contiguous q, k, v (padded (B, H, N, D), or packed (R, H, D) when starts is
// given) into out and lse: K rotated once per row by the pre-pass when k's tables are given
// (into a scratch the forward kernel reads), then the forward kernel, with q's tables only.
void run_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse, const at::Tensor& re, const int* lens, const int* starts,
             const OptT& q_cos, const OptT& q_sin, const OptT& k_cos, const OptT& k_sin,
             int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D, double scale) {
  const OptT qc = contiguous_table(q_cos), qs = contiguous_table(q_sin);
  const at::Tensor kr = k_cos ? rope_rows(k, k_cos->contiguous(), k_sin->contiguous(), B, H, Nk,
                                          lens, starts, k.scalar_type(), k.scalar_type(), 1.f)
                              : k;
  Params p{q.data_ptr(), kr.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
           re.data_ptr<int>(), lens, starts, table_ptr(qc), table_ptr(qs),
           (int)B, (int)H, (int)Nq, (int)Nk, (float)scale};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (D == 32) launch_fwd<32>(p, q.scalar_type(), stream);
  else if (D == 64) launch_fwd<64>(p, q.scalar_type(), stream);
  else launch_fwd<128>(p, q.scalar_type(), stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                                 const at::Tensor& v_,
                                                 at::OptionalIntArrayRef token_grans, double scale,
                                                 const OptT& seq_lens, const OptT& q_cos,
                                                 const OptT& q_sin, const OptT& k_cos,
                                                 const OptT& k_sin) {
  check_attention_args(q_, k_, v_, token_grans, q_cos, q_sin, k_cos, k_sin);
  check_cuda_args(q_, v_);
  const c10::cuda::CUDAGuard guard(q_.device());
  at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  at::Tensor re = row_end_device(Nq, token_grans, Nk, q.device());
  at::Tensor lens = seq_lens_device(seq_lens, B, q.device());
  at::Tensor out = at::empty({B, H, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  run_fwd(q, k, v, out, lse, re, lens.defined() ? lens.data_ptr<int>() : nullptr, nullptr, q_cos,
          q_sin, k_cos, k_sin, B, H, Nq, Nk, D, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_,
                                                        at::IntArrayRef seq_lens,
                                                        at::OptionalIntArrayRef token_grans,
                                                        double scale, const OptT& q_cos,
                                                        const OptT& q_sin, const OptT& k_cos,
                                                        const OptT& k_sin) {
  const VarlenRows rows = check_varlen_args(q_, k_, v_, seq_lens, token_grans, q_cos, q_sin,
                                            k_cos, k_sin);
  check_cuda_args(q_.transpose(0, 1).unsqueeze(0), v_.transpose(0, 1).unsqueeze(0));
  const c10::cuda::CUDAGuard guard(q_.device());
  // (R, H, D) contiguous: the model's q, k, v are heads of one fused projection (a row stride of
  // 3 H D), copied here as the padded path copies them
  at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = static_cast<int64_t>(rows.lens.size()), H = q.size(1), N = rows.max_len;
  const auto dev = q.device();
  at::Tensor re = row_end_device(N, token_grans, N, dev);
  // built once per value (index_memo.h)
  const auto to_int = [&](const std::vector<int64_t>& x) {
    return device_ints(std::vector<int32_t>(x.begin(), x.end()), dev);
  };
  at::Tensor lens = to_int(rows.lens), starts = to_int(rows.start);
  at::Tensor out = at::empty({q.size(0), H, q.size(2)}, q.options());
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  run_fwd(q, k, v, out, lse, re, lens.data_ptr<int>(), starts.data_ptr<int>(), q_cos, q_sin,
          k_cos, k_sin, B, H, N, N, q.size(2), scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, at::OptionalIntArrayRef token_grans,
    double scale, const OptT& seq_lens, const OptT& q_cos, const OptT& q_sin, const OptT& k_cos,
    const OptT& k_sin) {
  check_attention_args(q, k, v, token_grans, q_cos, q_sin, k_cos, k_sin);
  check_cuda_args(q, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "grad_out and out must have q's shape ", shape_str(q), "; got grad_out",
              shape_str(grad_out), " out", shape_str(out));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Nq,
              "lse must be (", B, ", ", H, ", ", Nq, "); got ", shape_str(lse));
  const auto T = q.scalar_type();
  at::Tensor lens = seq_lens_device(seq_lens, B, q.device());
  const int* lens_ptr = lens.defined() ? lens.data_ptr<int>() : nullptr;
  // the rotated rows the forward used, in fp32, once per row: q as it is rotated on load (fp32),
  // k as the pre-pass gave it to the forward (rounded to the input dtype); rows past a length
  // are not read
  const auto rotated = [&](const at::Tensor& x, const OptT& c, const OptT& s, int64_t n,
                           at::ScalarType round_t) {
    const at::Tensor xc = x.contiguous();
    return c ? rope_rows(xc, c->contiguous(), s->contiguous(), B, H, n, lens_ptr, nullptr,
                         at::kFloat, round_t, 1.f)
             : xc.to(at::kFloat);
  };
  at::Tensor qf = float2_aligned(rotated(q, q_cos, q_sin, Nq, at::kFloat));
  at::Tensor kf = float2_aligned(rotated(k, k_cos, k_sin, Nk, T));
  at::Tensor vf = float2_aligned(v.to(at::kFloat).contiguous());
  at::Tensor gof = float2_aligned(grad_out.to(at::kFloat).contiguous());
  at::Tensor delta = (gof * out.to(at::kFloat)).sum(-1).contiguous();
  at::Tensor lsef = lse.to(at::kFloat).contiguous();
  at::Tensor re = row_end_device(Nq, token_grans, Nk, q.device());
  at::Tensor dq = at::empty_like(qf), dk = at::empty_like(kf), dv = at::empty_like(vf);
  BwdParams p{qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(),
              gof.data_ptr<float>(), lsef.data_ptr<float>(), delta.data_ptr<float>(),
              dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
              re.data_ptr<int>(), lens_ptr, (int)B, (int)H, (int)Nq, (int)Nk, (float)scale};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (D == 32) launch_bwd<32>(p, stream);
  else if (D == 64) launch_bwd<64>(p, stream);
  else launch_bwd<128>(p, stream);
  // the gradients w.r.t. the unrotated rows: R^T applied to every row (rows past a length hold
  // zeros), straight into the input dtype
  const auto unrotated = [&](const at::Tensor& g, const OptT& c, const OptT& s, int64_t n) {
    return c ? rope_rows(g, c->contiguous(), s->contiguous(), B, H, n, nullptr, nullptr, T,
                         at::kFloat, -1.f)
             : g.to(T);
  };
  return {unrotated(dq, q_cos, q_sin, Nq), unrotated(dk, k_cos, k_sin, Nk), dv.to(v.scalar_type())};
}

}  // namespace cuda
}  // namespace adaperceiver
