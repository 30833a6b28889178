// Just enough of CUDA, on the host, to run this package's kernels without a GPU (tests only):
// a block's threads are std::threads, __shared__ arrays are statics (one block runs at a time),
// __syncthreads is a std::barrier over the block, and __shfl_xor_sync exchanges values through
// per-thread slots between two barriers of the lanes named by the mask (a row group: they run
// the same trip count, as the kernels require). float, __half and __nv_bfloat16 elements (the
// latter two rounded as the device rounds). Slow; enough to check indexing, masking, RoPE,
// conversions and the numerics of every instance the ops launch.
#pragma once

#include <algorithm>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;

namespace cuda_on_host {

struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> groups;  // per (first lane, width)
  std::vector<float> slots;
  int threads = 0;
};
inline Block* current = nullptr;

// Runs kernel() as grid.x * grid.y blocks of `threads` threads, one block after another.
template <typename F>
void launch(unsigned grid_x, unsigned grid_y, int threads, F kernel) {
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      Block blk;
      blk.threads = threads;
      blk.all = std::make_unique<std::barrier<>>(threads);
      blk.groups.resize(static_cast<size_t>(threads) * 33);
      blk.slots.assign(threads, 0.f);
      current = &blk;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          threadIdx = {static_cast<unsigned>(t), 0, 0};
          blockIdx = {bx, by, 0};
          kernel();
        });
      }
      for (auto& th : pool) th.join();
      current = nullptr;
    }
  }
}

}  // namespace cuda_on_host

inline void __syncthreads() { cuda_on_host::current->all->arrive_and_wait(); }

// The mask names `width` adjacent lanes of this thread's warp starting at `first`.
inline float __shfl_xor_sync(unsigned mask, float x, int lane_xor) {
  auto* blk = cuda_on_host::current;
  const int t = static_cast<int>(threadIdx.x), warp0 = t & ~31;
  const int width = std::popcount(mask), first = warp0 + std::countr_zero(mask);
  static std::mutex mu;
  std::barrier<>* bar;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto& slot = blk->groups[static_cast<size_t>(first) * 33 + width];
    if (!slot) slot = std::make_unique<std::barrier<>>(width);
    bar = slot.get();
  }
  blk->slots[t] = x;
  bar->arrive_and_wait();
  const float y = blk->slots[warp0 + ((t - warp0) ^ lane_xor)];
  bar->arrive_and_wait();
  return y;
}

// The element types, rounded as the device rounds them (to nearest even): fp16 through the
// compiler's _Float16, bf16 by its bits.
struct __half {
  _Float16 v;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace adaperceiver {
namespace cuda {
inline float to_f(float x) { return x; }
inline float to_f(__half x) { return static_cast<float>(x.v); }
inline float to_f(__nv_bfloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename T> T from_f(float x);
template <> inline float from_f<float>(float x) { return x; }
template <> inline __half from_f<__half>(float x) { return {static_cast<_Float16>(x)}; }
template <> inline __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if (std::isnan(x)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
}  // namespace cuda
}  // namespace adaperceiver
