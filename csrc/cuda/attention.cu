// Block-masked (group-causal) attention on CUDA: a tiled flash-style forward and a two-kernel
// backward, fp16/bf16/fp32 inputs with fp32 accumulation, compiled for sm_80 and sm_90.
//
// Forward schedule: one thread block per (batch * head, query tile of BM = 64 rows): grid.x is
// batch * head (up to 2^31 - 1), grid.y the query tile (launch.h); one thread
// per query row holding its rotated, scaled q and its output accumulator in registers. Key/value
// tiles of BN = 32 rows are staged in shared memory (converted to fp32, RoPE applied on load).
// Skipped: key tiles at or past kend = min(row_end[last row of the tile], len) are never loaded;
// tiles below min(row_end[first row], len) need no per-row test; in between each row stops at its
// own bound. Online softmax per row. Rows past seq_lens[b] write zeros and lse = -inf.
// Packed rows (attention_varlen_fwd: q, k, v, out (R, H, D), samples one after another) run the
// same kernel from each sample's first row; a sample has no rows past its length to write.
// Backward (kept simple, no atomics): kernel 1, one thread per query row, computes dq; kernel 2,
// one thread per key row, computes dk and dv over the query rows that see that key (a suffix of
// the rows, since row_end is nondecreasing). Inputs of the backward are rotated to fp32 by ATen
// on the host side; gradients are rotated back there.
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

constexpr int BM = 64;
constexpr int BN = 32;

struct Params {
  const void* q; const void* k; const void* v; void* out; float* lse;
  const int* row_end;  // (Nq,)
  const int* lens;     // (B,) or nullptr
  // packed rows: q, k, v, out (R, H, D) contiguous, sample b's rows from starts[b] (B,);
  // nullptr: padded (B, H, N, D) contiguous
  const int* starts;
  const float* q_cos; const float* q_sin; const float* k_cos; const float* k_sin;
  int B, H, Nq, Nk;
  float scale;
};

template <typename T, int D>
__global__ void __launch_bounds__(BM) attn_fwd_kernel(Params p) {
  __shared__ float ks[BN][D];
  __shared__ float vs[BN][D];
  const int bh = blockIdx.x, b = bh / p.H;
  const int m0 = blockIdx.y * BM, row = m0 + threadIdx.x;
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
  const T* q = static_cast<const T*>(p.q) + qbase + (active ? row : 0) * step;
  const T* kb = static_cast<const T*>(p.k) + kbase;
  const T* vb = static_cast<const T*>(p.v) + kbase;

  float qr[D], acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
#pragma unroll
  for (int i = 0; i < D / 2; ++i) {
    float x0 = active ? to_f(q[2 * i]) : 0.f, x1 = active ? to_f(q[2 * i + 1]) : 0.f;
    if (p.q_cos && active) {
      const float c = p.q_cos[row * (D / 2) + i], s = p.q_sin[row * (D / 2) + i];
      const float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
      x0 = y0;
      x1 = y1;
    }
    qr[2 * i] = x0 * p.scale;
    qr[2 * i + 1] = x1 * p.scale;
  }
  float m = -INFINITY, l = 0.f;
  for (int t0 = 0; t0 < kend; t0 += BN) {
    // stage K (rotated) and V of this tile in shared memory as fp32
    for (int e = threadIdx.x; e < BN * D / 2; e += BM) {
      const int j = e / (D / 2), i = e % (D / 2), key = t0 + j;
      float k0 = 0.f, k1 = 0.f, v0 = 0.f, v1 = 0.f;
      if (key < kend) {
        k0 = to_f(kb[(size_t)key * step + 2 * i]);
        k1 = to_f(kb[(size_t)key * step + 2 * i + 1]);
        v0 = to_f(vb[(size_t)key * step + 2 * i]);
        v1 = to_f(vb[(size_t)key * step + 2 * i + 1]);
        if (p.k_cos) {
          const float c = p.k_cos[key * (D / 2) + i], s = p.k_sin[key * (D / 2) + i];
          const float y0 = k0 * c - k1 * s, y1 = k0 * s + k1 * c;
          k0 = y0;
          k1 = y1;
        }
      }
      ks[j][2 * i] = k0;
      ks[j][2 * i + 1] = k1;
      vs[j][2 * i] = v0;
      vs[j][2 * i + 1] = v1;
    }
    __syncthreads();
    const int jn = min(BN, my_end - t0);  // this row's keys in the tile (<= 0: none)
    for (int j = 0; j < jn; ++j) {
      float s = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) s += qr[d] * ks[j][d];
      const float mnew = fmaxf(m, s);
      const float alpha = __expf(m - mnew);  // m = -inf on the first key: alpha = 0
      const float pj = __expf(s - mnew);
      l = l * alpha + pj;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] = acc[d] * alpha + pj * vs[j][d];
      m = mnew;
    }
    __syncthreads();
  }
  if (row < p.Nq) {
    const bool seen = my_end > 0;
    // a +inf score makes the row NaN (inf - inf) but its logsumexp +inf, as torch's logsumexp
    // (l is NaN then); NaN stays NaN through l: no guard turns a non-finite value into a number
    p.lse[(size_t)bh * p.Nq + row] = !seen ? -INFINITY : m == INFINITY ? m : m + logf(l);
    // packed: rows past the sample's length are the next sample's (not written)
    if (!packed || active) {
      T* o = static_cast<T*>(p.out) + qbase + (size_t)row * step;
      const float inv = seen ? 1.f / l : 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) o[d] = from_f<T>(seen ? acc[d] * inv : 0.f);
    }
  }
}

// A row's lse as the backward uses it: +inf (a +inf score; its forward output is NaN) becomes
// NaN, so that its p, hence its dk and dv, are NaN as in the reference, not exp(x - inf) = 0.
__device__ __forceinline__ float backward_lse(float lse) { return lse == INFINITY ? NAN : lse; }

struct BwdParams {
  const float *q, *k, *v, *go, *lse, *delta;  // fp32, contiguous; q, k rotated
  float *dq, *dk, *dv;                        // fp32 outputs (before un-rotation)
  const int* row_end;
  const int* lens;
  int B, H, Nq, Nk;
  float scale;
};

// dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j, one thread per query row.
template <int D>
__global__ void __launch_bounds__(BM) attn_bwd_dq_kernel(BwdParams p) {
  __shared__ float ks[BN][D];
  __shared__ float vs[BN][D];
  const int bh = blockIdx.x, b = bh / p.H;
  const int m0 = blockIdx.y * BM, row = m0 + threadIdx.x;
  const int len = p.lens ? max(p.lens[b], 0) : 0x7fffffff;
  const int lq = min(p.Nq, len), lk = min(p.Nk, len);
  const int last = min(m0 + BM, lq) - 1;
  const int kend = last >= m0 ? min(p.row_end[last], lk) : 0;
  const bool active = row < lq;
  const int my_end = active ? min(p.row_end[row], lk) : 0;
  const size_t ro = ((size_t)bh * p.Nq + (active ? row : 0)) * D;
  float qr[D], gr[D], dq[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qr[d] = active ? p.q[ro + d] : 0.f;
    gr[d] = active ? p.go[ro + d] : 0.f;
    dq[d] = 0.f;
  }
  const float lse = active ? backward_lse(p.lse[(size_t)bh * p.Nq + row]) : 0.f;
  const float delta = active ? p.delta[(size_t)bh * p.Nq + row] : 0.f;
  const float* kb = p.k + (size_t)bh * p.Nk * D;
  const float* vb = p.v + (size_t)bh * p.Nk * D;
  for (int t0 = 0; t0 < kend; t0 += BN) {
    for (int e = threadIdx.x; e < BN * D; e += BM) {
      const int j = e / D, d = e % D, key = t0 + j;
      ks[j][d] = key < kend ? kb[(size_t)key * D + d] : 0.f;
      vs[j][d] = key < kend ? vb[(size_t)key * D + d] : 0.f;
    }
    __syncthreads();
    const int jn = min(BN, my_end - t0);
    for (int j = 0; j < jn; ++j) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        s += qr[d] * ks[j][d];
        dp += gr[d] * vs[j][d];
      }
      const float pj = __expf(s * p.scale - lse);
      const float ds = pj * (dp - delta) * p.scale;
#pragma unroll
      for (int d = 0; d < D; ++d) dq[d] += ds * ks[j][d];
    }
    __syncthreads();
  }
  if (row < p.Nq) {
#pragma unroll
    for (int d = 0; d < D; ++d) p.dq[((size_t)bh * p.Nq + row) * D + d] = active ? dq[d] : 0.f;
  }
}

// dk_j, dv_j over the query rows that see key j: rows i in [first_i(j), lq), one thread per key.
template <int D>
__global__ void __launch_bounds__(BM) attn_bwd_dkv_kernel(BwdParams p) {
  __shared__ float qs[BN][D];
  __shared__ float gs[BN][D];
  __shared__ float ls[BN], dls[BN];
  __shared__ int res[BN];
  const int bh = blockIdx.x, b = bh / p.H;
  const int n0 = blockIdx.y * BM, key = n0 + threadIdx.x;
  const int len = p.lens ? max(p.lens[b], 0) : 0x7fffffff;
  const int lq = min(p.Nq, len), lk = min(p.Nk, len);
  const bool active = key < lk;
  const size_t ko = ((size_t)bh * p.Nk + (active ? key : 0)) * D;
  float kr[D], vr[D], dk[D], dv[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    kr[d] = active ? p.k[ko + d] : 0.f;
    vr[d] = active ? p.v[ko + d] : 0.f;
    dk[d] = 0.f;
    dv[d] = 0.f;
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
    for (int e = threadIdx.x; e < BN * D; e += BM) {
      const int i = e / D, d = e % D, r = i0 + i;
      qs[i][d] = r < lq ? qb[(size_t)r * D + d] : 0.f;
      gs[i][d] = r < lq ? gb[(size_t)r * D + d] : 0.f;
    }
    for (int i = threadIdx.x; i < BN; i += BM) {
      const int r = i0 + i;
      ls[i] = r < lq ? backward_lse(p.lse[(size_t)bh * p.Nq + r]) : 0.f;
      dls[i] = r < lq ? p.delta[(size_t)bh * p.Nq + r] : 0.f;
      res[i] = r < lq ? min(p.row_end[r], lk) : 0;
    }
    __syncthreads();
    for (int i = 0; i < BN; ++i) {
      if (!active || key >= res[i]) continue;  // row i0 + i does not see this key
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        s += qs[i][d] * kr[d];
        dp += gs[i][d] * vr[d];
      }
      const float pj = __expf(s * p.scale - ls[i]);
      const float ds = pj * (dp - dls[i]) * p.scale;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        dv[d] += pj * gs[i][d];
        dk[d] += ds * qs[i][d];
      }
    }
    __syncthreads();
  }
  if (key < p.Nk) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      p.dk[((size_t)bh * p.Nk + key) * D + d] = dk[d];
      p.dv[((size_t)bh * p.Nk + key) * D + d] = dv[d];
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

at::Tensor rope_ref(const at::Tensor& x, const OptT& cos, const OptT& sin, float sign) {
  if (!cos.has_value()) return x;
  auto xp = x.unflatten(-1, {-1, 2});
  auto x0 = xp.select(-1, 0), x1 = xp.select(-1, 1);
  auto c = *cos, s = *sin * sign;
  return at::stack({x0 * c - x1 * s, x0 * s + x1 * c}, -1).flatten(-2);
}

// (batch * head, row tiles) as a dim3; TORCH_CHECK names the limit a launch would exceed
dim3 grid_of(int64_t batch_heads, int64_t rows) {
  Grid2 g{0, 0};
  try {
    g = attention_grid(batch_heads, rows, BM);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, "the CUDA attention kernels cannot launch: ", e.what());
  }
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y));
}

template <int D>
void launch_fwd(const Params& p, at::ScalarType t, cudaStream_t stream) {
  const dim3 grid = grid_of((int64_t)p.B * p.H, p.Nq);
  if (grid.x == 0 || grid.y == 0) return;
  switch (t) {
    case at::kHalf: attn_fwd_kernel<__half, D><<<grid, BM, 0, stream>>>(p); break;
    case at::kBFloat16: attn_fwd_kernel<__nv_bfloat16, D><<<grid, BM, 0, stream>>>(p); break;
    default: attn_fwd_kernel<float, D><<<grid, BM, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D>
void launch_bwd(const BwdParams& p, cudaStream_t stream) {
  const int64_t bh = (int64_t)p.B * p.H;
  const dim3 grid_q = grid_of(bh, p.Nq), grid_k = grid_of(bh, p.Nk);
  if (grid_q.x > 0) {
    attn_bwd_dq_kernel<D><<<grid_q, BM, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (grid_k.x > 0) {
    attn_bwd_dkv_kernel<D><<<grid_k, BM, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The forward's launch on contiguous q, k, v (padded (B, H, N, D), or packed (R, H, D) when
// starts is given) into out and lse, with the RoPE tables (made contiguous) when given.
void run_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse, const at::Tensor& re, const int* lens, const int* starts,
             const OptT& q_cos, const OptT& q_sin, const OptT& k_cos, const OptT& k_sin,
             int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D, double scale) {
  const auto table = [](const OptT& t) { return t ? OptT(t->contiguous()) : OptT(); };
  const OptT qc = table(q_cos), qs = table(q_sin), kc = table(k_cos), ks = table(k_sin);
  const auto ptr = [](const OptT& t) { return t ? t->data_ptr<float>() : nullptr; };
  Params p{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
           re.data_ptr<int>(), lens, starts, ptr(qc), ptr(qs), ptr(kc), ptr(ks),
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
  at::Tensor qf = rope_ref(q.to(at::kFloat), q_cos, q_sin, 1.f).contiguous();
  at::Tensor kf = rope_ref(k.to(at::kFloat), k_cos, k_sin, 1.f).contiguous();
  at::Tensor vf = v.to(at::kFloat).contiguous(), gof = grad_out.to(at::kFloat).contiguous();
  at::Tensor delta = (gof * out.to(at::kFloat)).sum(-1).contiguous();
  at::Tensor lsef = lse.to(at::kFloat).contiguous();
  at::Tensor re = row_end_device(Nq, token_grans, Nk, q.device());
  at::Tensor lens = seq_lens_device(seq_lens, B, q.device());
  at::Tensor dq = at::empty_like(qf), dk = at::empty_like(kf), dv = at::empty_like(vf);
  BwdParams p{qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(),
              gof.data_ptr<float>(), lsef.data_ptr<float>(), delta.data_ptr<float>(),
              dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
              re.data_ptr<int>(), lens.defined() ? lens.data_ptr<int>() : nullptr,
              (int)B, (int)H, (int)Nq, (int)Nk, (float)scale};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (D == 32) launch_bwd<32>(p, stream);
  else if (D == 64) launch_bwd<64>(p, stream);
  else launch_bwd<128>(p, stream);
  dq = rope_ref(dq, q_cos, q_sin, -1.f);
  dk = rope_ref(dk, k_cos, k_sin, -1.f);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace cuda
}  // namespace adaperceiver
