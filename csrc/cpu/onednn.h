// oneDNN's matmul on a plain (unpacked) weight, mkldnn::_linear_pointwise: the one way the
// extension calls it (defined in cpu/gemm_lowp.cpp).
//
// The library the model's float32 CPU projections use (adaperceiver/ops/linear.py says why:
// MKL takes a generic path on AMD CPUs) and the one that runs bfloat16 / float16 GEMMs on
// AMX / AVX512-BF16 / AVX512-FP16. Looked up once; unavailable when this torch has no oneDNN
// or ADAPERCEIVER_CPU_GEMM=mkl (read as ops/linear.py reads it: surrounding blanks and case
// ignored), so the FFN, the row blocks and the projections always agree on the library.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>

namespace adaperceiver {
namespace cpu {

// What oneDNN applies to the float32 product (plus bias) before the one rounding to the
// output dtype: nothing, or the exact (erf) GELU.
enum class PostOp { kNone, kGelu };

// Whether onednn_linear runs (oneDNN present and not switched off).
bool onednn_linear_available();

// x (M, K) times weight (N, K) transposed, plus bias (N,) when given, then post_op: a new
// (M, N) tensor in x's dtype, one oneDNN GEMM with float32 accumulation. nullopt when
// !onednn_linear_available(). A strided weight (a column slice) is made contiguous first:
// oneDNN would run it on its reference kernel, orders of magnitude slower.
std::optional<at::Tensor> onednn_linear(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        PostOp post_op = PostOp::kNone);

// Per-row extents of a bfloat16 tile_linear product, one value per row of x (a small batch of
// several Matryoshka widths: csrc/ffn_banded.cpp). kOutputs: row r needs only its outputs below
// ext[r] (fc1 up to each sample's width); those at or past it are unspecified (blocks of 32
// outputs past the extents of all 32 rows of a row block are not computed). kInner: row r
// takes x's columns at or past ext[r] as 0 (fc2 over each sample's width; every K step still
// runs, so 0 times an inf or NaN weight past a row's width is NaN, as in the reference's 0/1
// mask, whatever the widths of the rows around it). fc1 by kOutputs then fc2 by kInner is the
// pair at the widest width with the units past each row's width zeroed.
struct RowExtents {
  enum Kind { kOutputs, kInner } kind;
  const int64_t* ext;
};

// The same product on AMX tiles without reordering the weight (cpu/tile_linear.cpp, which says
// why): bfloat16 or float16 x (..., K), weight (N, K) of unit column stride (a column slice runs
// in place), bias (N,) or none, then post_op, with extents (bfloat16 only) when given; a new
// (..., N) tensor. Raises unless tile_linear_takes(rows, dtype), the one statement of when the
// model's bf16 / fp16 GEMMs take it (why not: tile_linear_why_not).
std::string tile_linear_why_not(int64_t rows, at::ScalarType dtype, bool row_extents = false);
bool tile_linear_takes(int64_t rows, at::ScalarType dtype, bool row_extents = false);
at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, PostOp post_op = PostOp::kNone,
                       const RowExtents* extents = nullptr);

// GEMMs oneDNN's AMX matmul runs on ONE of 2 threads. With 2 threads, oneDNN's bf16 matmul runs
// a product of 768 < n <= 1100 outputs on one thread when its rows fall in a band (n = 832:
// rows 800..1600; n = 1069: 1280..1792); the band depends on (rows, n) and the thread count,
// not on the values. The model's output projection and fc2 (n = 832) at batch 4 x 256 latents
// (1024 rows) sit in it. gemm_row_chunks says how many consecutive row blocks of <= 768 rows
// such a product runs as (1: one GEMM, outside the band, or inside a parallel region, where
// oneDNN runs on the calling thread alone). The FFN's backward runs its GEMMs on those row
// blocks; the forward's products in the band run on per-thread row blocks (below). The rule
// reads the shape and the thread count only, never timings, so the same inputs give the same
// outputs whatever ran before. It applies to bfloat16 on a CPU with native bf16 GEMMs
// (native_bf16_gemm, which does not tell AMX from AVX512-BF16 alone) at 2 threads, with oneDNN
// in use; elsewhere one GEMM runs. The one statement of the rule.
int64_t gemm_row_chunks(int64_t rows, int64_t outputs, at::ScalarType dtype);

// Per-thread row blocks: a bfloat16 product whose rows fall in the bands below runs as one
// consecutive block of rows per thread, each block one oneDNN call on its thread alone
// (linear_row_blocks in cpu/gemm_lowp.cpp; the FFN's pair in csrc/ffn_banded.cpp). Why: each
// thread's rows of the result then stay in its own core's cache for the model's next op on the
// same rows (the norms, the attention's samples and the next projection split their rows
// between the threads in the same order), where oneDNN's 2-thread matmul splits a product so
// that half of a thread's next rows sit in the other core's cache; and in the one-thread band
// above both threads work. Each thread reorders the whole weight for its block, so at many rows
// oneDNN's own split, which reorders it once, wins again (figures: benchmarks/README.md, "GEMMs
// in bf16"). At 2 threads, bfloat16, oneDNN in use, outside a parallel region:
// - gemm_thread_rows: a projection in the one-thread band (gemm_row_chunks > 1: 768 < outputs
//   <= 1100 on 800..1663 rows, on any CPU with native bf16 GEMMs), or, on AMX tiles
//   (tiles_why_not), of more than 1100 outputs on 800..1279 rows;
// - ffn_thread_rows, on AMX tiles: the FFN's pair (fc1 with its GELU, then fc2 on the same
//   thread, so that the hidden activation of a block stays in its core's cache between the
//   two) on 768..2047 rows.
// Each returns the rows per block (a multiple of 32, about rows / 2) or 0 (one GEMM, or one
// pair). A function of the shape and the thread count only; each output is one oneDNN product
// over the full K either way.
int64_t gemm_thread_rows(int64_t rows, int64_t outputs, at::ScalarType dtype);
int64_t ffn_thread_rows(int64_t rows, at::ScalarType dtype);

}  // namespace cpu
}  // namespace adaperceiver
