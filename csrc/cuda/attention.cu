// Block-masked (group-causal) attention on CUDA: a forward with an online softmax over key tiles
// staged in shared memory (scalar FMAs by row groups of lanes, no tensor cores) and a two-kernel
// backward, fp16/bf16/fp32 inputs with fp32 accumulation, compiled for sm_80 and sm_90. The
// kernels are in attention_kernels.cuh; this file launches them.
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
#include "attention_kernels.cuh"  // after convert.h: the kernels use to_f / from_f

namespace adaperceiver {
namespace cuda {
namespace {

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

template <typename In, typename Out, typename Round>
void launch_rope(const dim3& grid, cudaStream_t stream, const RopeParams& p) {
  rope_rows_kernel<In, Out, Round><<<grid, kRopeThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
  using F16 = __half;
  using BF16 = __nv_bfloat16;
  // the instances the ops use: the forward's K (T -> T), the backward's q (T -> fp32) and k
  // (T -> fp32 rounded to T), its gradients back (fp32 -> T)
  if (in_t == out_t && out_t == round_t) {
    switch (in_t) {
      case at::kHalf: launch_rope<F16, F16, F16>(grid, stream, p); break;
      case at::kBFloat16: launch_rope<BF16, BF16, BF16>(grid, stream, p); break;
      case at::kFloat: launch_rope<float, float, float>(grid, stream, p); break;
      default: bad();
    }
  } else if (out_t == at::kFloat && (round_t == at::kFloat || round_t == in_t)) {
    const bool round = round_t != at::kFloat;
    switch (in_t) {
      case at::kHalf:
        round ? launch_rope<F16, float, F16>(grid, stream, p)
              : launch_rope<F16, float, float>(grid, stream, p);
        break;
      case at::kBFloat16:
        round ? launch_rope<BF16, float, BF16>(grid, stream, p)
              : launch_rope<BF16, float, float>(grid, stream, p);
        break;
      default: bad();  // fp32 -> fp32 is the first branch
    }
  } else if (in_t == at::kFloat && round_t == at::kFloat) {
    switch (out_t) {
      case at::kHalf: launch_rope<float, F16, float>(grid, stream, p); break;
      case at::kBFloat16: launch_rope<float, BF16, float>(grid, stream, p); break;
      default: bad();
    }
  } else {
    bad();
  }
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

std::tuple<at::Tensor, at::Tensor> attention_fwd(ADAPERCEIVER_ATTENTION_FWD_PARAMS) {
  check_attention_args(q, k, v, token_grans, q_cos, q_sin, k_cos, k_sin);
  check_cuda_args(q, v);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  at::Tensor re = row_end_device(Nq, token_grans, Nk, qc.device());
  at::Tensor lens = seq_lens_device(seq_lens, B, qc.device());
  at::Tensor out = at::empty({B, H, Nq, D}, qc.options());
  at::Tensor lse = at::empty({B, H, Nq}, qc.options().dtype(at::kFloat));
  run_fwd(qc, kc, vc, out, lse, re, lens.defined() ? lens.data_ptr<int>() : nullptr, nullptr,
          q_cos, q_sin, k_cos, k_sin, B, H, Nq, Nk, D, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(
    ADAPERCEIVER_ATTENTION_VARLEN_FWD_PARAMS) {
  const VarlenRows rows = check_varlen_args(q, k, v, seq_lens, token_grans, q_cos, q_sin,
                                            k_cos, k_sin);
  check_cuda_args(q.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0));
  const c10::cuda::CUDAGuard guard(q.device());
  // (R, H, D) contiguous: the model's q, k, v are heads of one fused projection (a row stride of
  // 3 H D), copied here as the padded path copies them
  at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int64_t B = static_cast<int64_t>(rows.lens.size()), H = qc.size(1), N = rows.max_len;
  const auto dev = qc.device();
  at::Tensor re = row_end_device(N, token_grans, N, dev);
  // built once per value (index_memo.h)
  const auto to_int = [&](const std::vector<int64_t>& x) {
    return device_ints(std::vector<int32_t>(x.begin(), x.end()), dev);
  };
  at::Tensor lens = to_int(rows.lens), starts = to_int(rows.start);
  at::Tensor out = at::empty({qc.size(0), H, qc.size(2)}, qc.options());
  at::Tensor lse = at::empty({B, H, N}, qc.options().dtype(at::kFloat));
  run_fwd(qc, kc, vc, out, lse, re, lens.data_ptr<int>(), starts.data_ptr<int>(), q_cos, q_sin,
          k_cos, k_sin, B, H, N, N, qc.size(2), scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(ADAPERCEIVER_ATTENTION_BWD_PARAMS) {
  check_attention_args(q, k, v, token_grans, q_cos, q_sin, k_cos, k_sin);
  check_cuda_args(q, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  check_attention_bwd_args(grad_out, out, lse, q, v);
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
