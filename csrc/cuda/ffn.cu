// Matryoshka FFN forward on CUDA: two tiled GEMM kernels that skip the hidden units past each
// row's width, fp16/bf16/fp32 inputs with fp32 accumulation, compiled for sm_80 and sm_90.
//
// Row r of the flattened (B*N, C) input has width h(r) = hidden[r / N].
// Kernel 1: act[r, j] = GELU(x[r] . W1[j] + b1[j]) for j < h(r) (0 for j >= h(r)), in 32 x 32
// tiles of (rows, hidden units) with 32-deep reduction steps through shared memory; a tile whose
// first hidden unit is past the largest width of its rows is skipped entirely.
// Kernel 2: out[r, c] = b2[c] + sum_{j < hmax(tile)} act[r, j] W2[c, j]: the reduction stops at
// the largest width of the row tile (units past a row's own width are the zeros kernel 1 wrote).
// The backward runs the width-banded ATen GEMMs of ffn_banded.cpp (cuBLAS on weight slices) on
// the samples put widest first here, by device-resident permutations from the index memo
// (index_memo.h): ffn_banded.cpp would build its own order on the host and copy it every call.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common.h"
#include "convert.h"
#include "ffn_banded.h"
#include "index_memo.h"
#include "kernels.h"
#include "launch.h"

namespace adaperceiver {
namespace cuda {
namespace {

constexpr int T = 32;  // tile edge; blocks of 32 x 8 threads, 4 outputs per thread

// largest width among rows [r0, r0 + T) of the (rows,) width table
__device__ int tile_hmax(const int* row_h, int r0, int rows) {
  __shared__ int hm;
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    int m = 0;
    for (int r = r0; r < min(r0 + T, rows); ++r) m = max(m, row_h[r]);
    hm = m;
  }
  __syncthreads();
  return hm;
}

template <typename S>
__global__ void __launch_bounds__(256) fc1_gelu_kernel(const S* x, const S* w1, const S* b1,
                                                       const int* row_h, float* act, int rows,
                                                       int C, int Hmax) {
  __shared__ float xs[T][T + 1];
  __shared__ float ws[T][T + 1];
  const int r0 = blockIdx.x * T, j0 = blockIdx.y * T;  // row tiles on x (launch.h)
  const int hmax = tile_hmax(row_h, r0, rows);
  if (j0 >= hmax) return;  // no row of the tile is this wide: skipped (never read by fc2)
  const int tx = threadIdx.x, ty = threadIdx.y;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int c0 = 0; c0 < C; c0 += T) {
    for (int i = ty; i < T; i += 8) {
      const int r = r0 + i, c = c0 + tx, j = j0 + i;
      xs[i][tx] = (r < rows && c < C) ? to_f(x[(size_t)r * C + c]) : 0.f;
      ws[i][tx] = (j < Hmax && c < C) ? to_f(w1[(size_t)j * C + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < T; ++c) {
      const float wv = ws[tx][c];
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[u] += xs[ty + 8 * u][c] * wv;
    }
    __syncthreads();
  }
  const int j = j0 + tx;
  if (j >= Hmax) return;
  const float bias = to_f(b1[j]);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int r = r0 + ty + 8 * u;
    if (r >= rows) continue;
    const float pre = acc[u] + bias;
    const float g = 0.5f * pre * (1.f + erff(pre * 0.70710678118654752f));
    act[(size_t)r * Hmax + j] = j < row_h[r] ? g : 0.f;
  }
}

template <typename S>
__global__ void __launch_bounds__(256) fc2_kernel(const float* act, const S* w2, const S* b2,
                                                  const int* row_h, S* out, int rows, int Hmax,
                                                  int Cout) {
  __shared__ float as[T][T + 1];
  __shared__ float ws[T][T + 1];
  const int r0 = blockIdx.x * T, c0 = blockIdx.y * T;  // row tiles on x (launch.h)
  const int hmax = tile_hmax(row_h, r0, rows);
  const int tx = threadIdx.x, ty = threadIdx.y;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j0 = 0; j0 < hmax; j0 += T) {  // reduction stops at the tile's widest row
    for (int i = ty; i < T; i += 8) {
      const int r = r0 + i, j = j0 + tx, c = c0 + i;
      as[i][tx] = (r < rows && j < hmax) ? act[(size_t)r * Hmax + j] : 0.f;
      ws[i][tx] = (c < Cout && j < hmax) ? to_f(w2[(size_t)c * Hmax + j]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < T; ++j) {
      const float wv = ws[tx][j];
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[u] += as[ty + 8 * u][j] * wv;
    }
    __syncthreads();
  }
  const int c = c0 + tx;
  if (c >= Cout) return;
  const float bias = to_f(b2[c]);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int r = r0 + ty + 8 * u;
    if (r < rows) out[(size_t)r * Cout + c] = from_f<S>(acc[u] + bias);
  }
}

template <typename S>
void launch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
            const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& row_h,
            at::Tensor& act, at::Tensor& out) {
  const int rows = (int)(x.size(0) * x.size(1)), C = (int)x.size(2), Hmax = (int)w1.size(0),
            Cout = (int)w2.size(0);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(T, 8);
  const auto grid = [](int64_t rows_, int64_t cols) {
    Grid2 g{0, 0};
    try {
      g = checked_grid(ceil_div(rows_, T), ceil_div(cols, T));
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, "the CUDA Matryoshka FFN cannot launch: ", e.what());
    }
    return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y));
  };
  fc1_gelu_kernel<S><<<grid(rows, Hmax), block, 0, stream>>>(
      reinterpret_cast<const S*>(x.data_ptr()), reinterpret_cast<const S*>(w1.data_ptr()),
      reinterpret_cast<const S*>(b1.data_ptr()), row_h.data_ptr<int>(), act.data_ptr<float>(),
      rows, C, Hmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  fc2_kernel<S><<<grid(rows, Cout), block, 0, stream>>>(
      act.data_ptr<float>(), reinterpret_cast<const S*>(w2.data_ptr()),
      reinterpret_cast<const S*>(b2.data_ptr()), row_h.data_ptr<int>(),
      reinterpret_cast<S*>(out.data_ptr()), rows, Hmax, Cout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor ffn_fwd(ADAPERCEIVER_FFN_FWD_PARAMS) {
  check_ffn_args(x, w1, b1, w2, b2, hidden);
  TORCH_CHECK(x.is_cuda(), "matryoshka_ffn_fwd (CUDA kernel) got tensors on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous(), w1c = w1.contiguous(), b1c = b1.contiguous(),
             w2c = w2.contiguous(), b2c = b2.contiguous();
  const int64_t B = xc.size(0), N = xc.size(1);
  // each row's width: the B widths copied once per value (index_memo.h), then repeated N
  // times on the device
  at::Tensor row_h = device_ints(std::vector<int32_t>(hidden.begin(), hidden.end()), xc.device())
                         .repeat_interleave(N);
  at::Tensor act = at::empty({B * N, w1c.size(0)}, xc.options().dtype(at::kFloat));
  at::Tensor out = at::empty({B, N, w2c.size(0)}, xc.options());
  switch (xc.scalar_type()) {
    case at::kHalf: launch<__half>(xc, w1c, b1c, w2c, b2c, row_h, act, out); break;
    case at::kBFloat16: launch<__nv_bfloat16>(xc, w1c, b1c, w2c, b2c, row_h, act, out); break;
    default: launch<float>(xc, w1c, b1c, w2c, b2c, row_h, act, out); break;
  }
  return out;
}

// The samples widest first (stable, as ffn_banded.cpp orders them) and back: perm[i] is the
// sample at position i, inv[b] the position of sample b.
struct WidestFirst {
  std::vector<int32_t> perm, inv;
  bool in_order = true;

  explicit WidestFirst(at::IntArrayRef hidden) : perm(hidden.size()), inv(hidden.size()) {
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int32_t a, int32_t b) { return hidden[a] > hidden[b]; });
    for (size_t i = 0; i < perm.size(); ++i) {
      inv[perm[i]] = static_cast<int32_t>(i);
      in_order = in_order && perm[i] == static_cast<int32_t>(i);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(
    ADAPERCEIVER_FFN_BWD_PARAMS) {
  check_ffn_args(x, w1, b1, w2, b2, hidden);
  TORCH_CHECK(x.is_cuda(), "matryoshka_ffn_bwd (CUDA) got tensors on ", x.device());
  // no device guard needed: only ATen ops run here (each guards its own launches)
  const WidestFirst order(hidden);
  // already widest first: ffn_banded.cpp reads and writes the rows in place (no index tensor)
  if (order.in_order) return ffn_bwd_banded(grad_out, x, w1, b1, w2, b2, hidden);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == x.size(0), "grad_out must be (",
              x.size(0), ", N, C_out); got ", shape_str(grad_out));
  // the permutations on the device, built once per value (index_memo.h): a repeated mixed batch
  // makes no host-to-device copy
  const at::Tensor perm = device_ints(order.perm, x.device());
  const at::Tensor inv = device_ints(order.inv, x.device());
  std::vector<int64_t> sorted(hidden.size());
  for (size_t i = 0; i < sorted.size(); ++i) sorted[i] = hidden[order.perm[i]];
  auto grads = ffn_bwd_banded(grad_out.index_select(0, perm), x.index_select(0, perm), w1, b1,
                              w2, b2, sorted);
  std::get<0>(grads) = std::get<0>(grads).index_select(0, inv);
  return grads;
}

}  // namespace cuda
}  // namespace adaperceiver
