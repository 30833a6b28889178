// Launch geometry of the CUDA kernels, pure functions (no CUDA or torch headers) so that they
// can be compiled and checked on a host without a GPU (tests/test_gpu_path.py).
//
// A grid's x dimension may hold 2^31 - 1 blocks, its y and z dimensions 65535 each. The
// dimension that grows with the batch goes on x: attention puts (batch * head) there (the
// model's 13 heads pass 65535 at a batch of 5042), its row tiles on y (ceil(N / 64) <= 65535
// for any N up to 4M; the model's N is at most 4096); the FFN puts its B * N row tiles on x and
// its hidden / output column tiles on y.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace adaperceiver {
namespace cuda {

struct Grid2 {
  int64_t x;  // batch * head
  int64_t y;  // row tiles: ceil(rows / rows_per_block)
};

constexpr int64_t kGridXMax = 2147483647;
constexpr int64_t kGridYMax = 65535;

// A 2-d grid of x by y blocks, checked against the limits; {0, 0} when there is no work.
// Throws std::invalid_argument naming the limit a dimension exceeds.
inline Grid2 checked_grid(int64_t x, int64_t y) {
  if (x < 0 || y < 0)
    throw std::invalid_argument("grid (" + std::to_string(x) + ", " + std::to_string(y) +
                                ") must not be negative");
  if (x == 0 || y == 0) return {0, 0};
  if (x > kGridXMax)
    throw std::invalid_argument("grid.x = " + std::to_string(x) + " exceeds the CUDA limit " +
                                std::to_string(kGridXMax));
  if (y > kGridYMax)
    throw std::invalid_argument("grid.y = " + std::to_string(y) + " exceeds the CUDA limit " +
                                std::to_string(kGridYMax));
  return {x, y};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The grid of one attention launch: (batch * head, ceil(rows / rows_per_block)).
inline Grid2 attention_grid(int64_t batch_heads, int64_t rows, int64_t rows_per_block) {
  if (rows < 0 || rows_per_block <= 0)
    throw std::invalid_argument("attention_grid: rows=" + std::to_string(rows) +
                                ", rows_per_block=" + std::to_string(rows_per_block) +
                                " must be >= 0 and > 0");
  return checked_grid(batch_heads, ceil_div(rows, rows_per_block));
}

}  // namespace cuda
}  // namespace adaperceiver
