// The device code of the CUDA attention (attention.cu has the schedule and the host side): the
// forward kernel, the RoPE pre-pass and the two backward kernels. Included by attention.cu
// after convert.h (to_f / from_f); also compiled for the host by tests/test_gpu_path.py with
// emulation/cuda_on_host.h standing in for CUDA (threads, shared memory, barriers, shuffles),
// so the kernels' indexing and numerics run on a machine without a GPU.
#pragma once

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

// The block's query tile: (sample, head) bh = blockIdx.x, rows [m0, m0 + BM) from blockIdx.y, this
// thread's row and its part of it (row groups of L lanes), the sample's query / key lengths, the
// tile's last read key (kend), this row's (my_end, 0 past the sample's queries), whether the row
// is one of the sample's (active) and the lane mask of its row group. The kernels unpack it with
// a structured binding, in this order.
template <int L>
struct QueryTile {
  int bh, b, m0, row, part, lq, lk, kend, my_end;
  bool active;
  unsigned mask;
  __device__ QueryTile(int H, int Nq, int Nk, const int* lens, const int* row_end) {
    bh = blockIdx.x;
    b = bh / H;
    m0 = blockIdx.y * BM;
    row = m0 + threadIdx.x / L;
    part = threadIdx.x % L;
    const int len = lens ? max(lens[b], 0) : 0x7fffffff;
    lq = min(Nq, len);
    lk = min(Nk, len);
    const int last = min(m0 + BM, lq) - 1;
    kend = last >= m0 ? min(row_end[last], lk) : 0;
    active = row < lq;
    my_end = active ? min(row_end[row], lk) : 0;
    mask = group_mask<L>();
  }
};

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
  const auto [bh, b, m0, row, part, lq, lk, kend, my_end, active, mask] =
      QueryTile<L>(p.H, p.Nq, p.Nk, p.lens, p.row_end);
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
  const auto [bh, b, m0, row, part, lq, lk, kend, my_end, active, mask] =
      QueryTile<L>(p.H, p.Nq, p.Nk, p.lens, p.row_end);
  const size_t ro = ((size_t)bh * p.Nq + (active ? row : 0)) * D;
  const float2* qrow = reinterpret_cast<const float2*>(p.q + ro);
  const float2* grow = reinterpret_cast<const float2*>(p.go + ro);
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

}  // namespace
}  // namespace cuda
}  // namespace adaperceiver
