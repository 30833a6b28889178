// tile_linear(x, weight, bias): y (M, N) = x (M, K) weight (N, K)^T + bias in bfloat16 (float16:
// below) on AMX tiles, float32 accumulation, the bias added in float32, optionally the exact
// (erf) GELU of that float32 sum (fc1's epilogue), one rounding: what oneDNN's inner product
// (with its GELU post-op) computes, with the products summed in another order.
// Why: at a few hundred rows oneDNN's bf16 matmul costs about what reading and reordering its
// plain weight costs, on every call (nothing may be cached: an edit of the weight must be seen).
// Here the weight is the tiles' A operand as it is (16 rows x 32 values a tile, any row stride,
// so fc2's column slice runs in place) and is never reordered; x, the smaller operand, is
// packed once per call. Figures and the row limit: benchmarks/README.md, "GEMMs in bf16".
// Schedule: x packed into VNNI pairs (blocks of 16 k-pairs x 16 rows, 1 KiB, one B tile each),
// in parallel over 16-row blocks. Threads take consecutive blocks of 32 outputs (of equal
// count, or of equal work with RowExtents below), each read from memory once while the packed
// x stays in L2; per 32 rows four float32 C tiles (2 weight tiles x 2 x tiles) over K in steps
// of 32. A block's C tiles are stored and their epilogue (GELU, 16 x 16 transpose to rows of
// y, bias, rounding) runs in pieces inside the next block's k loop (PendingBlock), so the
// vector work overlaps the tile products, and the next block's weight rows are prefetched
// there (NextRowsPrefetch). With RowExtents (a batch of several FFN widths, up to 448 rows)
// fc1's output blocks past the widest width among a 32-row block's rows are skipped, and fc2
// takes each row's units past its own width as 0. Each output is one float32 sum over K in a
// fixed order: the thread count and the batch around a row never change a result.
// Tails: rows past M are zeros in the packed x and never stored; a last block of fewer than 32
// outputs reads a zero-padded copy of its rows, a last K step of fewer than 32 values a
// zero-padded copy of its columns (no memory past the weight's K columns is read).
// float16 (half_linear_kernel below; CPUs with AMX-BF16 but no AMX-FP16, where oneDNN's
// float16 GEMM runs at about float32 speed): every float16 value v is split exactly into two
// bfloat16, hi = v rounded to bfloat16 and lo = v - hi (at most 2 significant bits, within
// bfloat16's range: checked over every finite float16), so v w = hi_v hi_w + hi_v lo_w +
// lo_v hi_w + lo_v lo_w, four exact products summed in float32 per K step: the float32
// accumulation of exact products that oneDNN's float16 GEMM computes, in another order, then one
// rounding to float16. x's halves are packed as above; each block of 32 weight rows is split
// into an L2-resident panel of tiles (k step major) as the block starts, so tails of N and K are
// zero-padded there. The split of inf or NaN is not exact (inf - inf): the outputs of a row of x
// or of the weight that holds one (all of them inf or NaN in the product) are recomputed by
// oneDNN, the others stay the tiles'.
// What it skips: nothing is cached between calls.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/accumulate.h>

#include "common.h"
#include "kernels.h"
#include "cpu/avx512_math.h"
#include "cpu/microkernel.h"
#include "cpu/onednn.h"
#include "cpu/vec_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace adaperceiver {
namespace cpu {
namespace {

// Rows up to which tile_linear runs instead of oneDNN's matmul: above them oneDNN's reorder is
// spread over enough rows that its kernel, tuned further, is as fast or faster (the figures).
// At most 256 rows of packed x (K <= 4096: 2 MiB) stay in L2 while a thread's weight passes.
// With RowExtents (a pair of FFN GEMMs over several widths, against oneDNN's pair at the widest
// width) the FLOPs it skips keep it ahead up to more rows.
constexpr int64_t kTileLinearMaxRows = 256;
constexpr int64_t kTileLinearMaxRowsExtents = 448;

// float16 rows per pass of half_linear_kernel: its packed halves of x take 4 bytes a value
// (16 MiB at K = 2048); each pass splits the weight again, a small cost next to its products.
constexpr int64_t kHalfRowChunk = 2048;

#if defined(__x86_64__) && defined(__GNUC__)
// Linux hands a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); asked once, a fact of the process afterwards.
bool tile_state_granted() {
  static const bool yes = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                  18 /* XFEATURE_XTILEDATA */) == 0;
  return yes;
}

// The tile configuration (palette 1): tiles 0-3 the float32 C tiles (16 x 16), 4-5 weight tiles
// (16 rows x 32 bf16), 6-7 x tiles (16 k-pairs x 16 rows of pairs); 64 bytes a row for all.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration above on this thread. cpublas::brgemm (the attention's, ATen's) keeps
// its kernel's tile configuration loaded across calls on a thread and reloads it only for
// another kernel: it is told first that its configuration is gone, as it is once the caller's
// tile_release has run.
__attribute__((target("amx-tile"))) void load_tile_config() {
  at::native::cpublas::brgemm_release(true);
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  // GCC's ldtilecfg builtin declares no memory read: without the barrier the stores above may be
  // moved past it (a zeroed palette leaves the tiles unconfigured, and the first tile op faults)
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

#define ADAPERCEIVER_TILE_VEC_TARGET "avx512f,avx512bw,avx512vl,avx512bf16"

// One C tile (16 outputs x 16 rows, float32, a row per output) into y (bfloat16 or float16):
// rows [0, rows) of y (stride ldy), outputs [0, cols); bias (cols values, float32) added first
// when given; one rounding to nearest even.
template <typename T>
__attribute__((target(ADAPERCEIVER_TILE_VEC_TARGET))) void store_tile(
    const float* c, const float* bias, T* y, int64_t ldy, int64_t rows, int64_t cols) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + 16 * i);
  transpose16x16(r);
  const __mmask16 kc = lanes_below(cols, 0);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(kc, bias) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[m]), b);
    __m256i h;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      h = (__m256i)_mm512_cvtneps_pbh(v);
    } else {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_mask_storeu_epi16(y + m * ldy, kc, h);
  }
}

// x (M x K, row stride ldx) into xv: block (k step s, 16-row block mb) at (s * mblocks + mb) *
// 256 holds in row i (16 pairs) pair i of the step of each of the 16 rows; zeros past K and M,
// and with kext (the rows' K extents, see RowExtents) past a row's extent. Row blocks
// [mb0, mb1) (the parallel loop's body: a lambda would not carry the target).
__attribute__((target("avx512f,avx512bw"))) void pack_x_blocks(const c10::BFloat16* x, int64_t M,
                                                                int64_t K, int64_t ldx,
                                                                int64_t ksteps, int64_t mblocks,
                                                                int64_t mb0, int64_t mb1,
                                                                const int64_t* kext,
                                                                uint32_t* xv) {
  for (int64_t mb = mb0; mb < mb1; ++mb) {
    for (int64_t s = 0; s < ksteps; ++s) {
      const int64_t k0 = s * 32;
      const __mmask32 km = lanes32_below(K, k0);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = mb * 16 + i;
        const __mmask32 kr = kext && m < M ? km & lanes32_below(kext[m], k0) : km;
        r[i] = m < M ? _mm512_maskz_loadu_epi16(kr, x + m * ldx + k0) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      uint32_t* blk = xv + (s * mblocks + mb) * 256;
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(blk + 16 * i, r[i]);
    }
  }
}

// The four C tiles into c (16 x 16 float32 each, 64-byte rows).
__attribute__((target("amx-tile"))) inline void store_c_tiles(float (*c)[256]) {
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
}

// The epilogue of a block of 32 outputs x 32 rows, run in pieces inside the next block's k loop
// (step, a few pieces per K step) so that the vector work overlaps the tile products: C tile t
// holds outputs n0 + (t / 2) * 16 (a row each) of rows m0 + (t % 2) * 16. Adds the bias, with
// gelu takes the exact GELU of the biased float32 sum (fc1's epilogue; 8 pieces of 32 values a
// tile, the GELU costing several times a K step's products), rounds once into y (M x N).
template <typename T>
struct PendingBlock {
  static constexpr int kGeluPieces = 8;  // per C tile, before its store
  const float* bias;  // float32, or null
  bool gelu;
  T* y;
  int64_t M, N;
  int64_t n0 = -1, m0 = 0;                // the block whose C tiles wait in c (none: n0 < 0)
  int done = 0;                           // pieces of its epilogue run
  alignas(64) float c[4][256];
  alignas(64) float bias_tiles[2][256];  // (with gelu) the bias of each C tile element

  PendingBlock(const float* bias, bool gelu, T* y, int64_t M, int64_t N)
      : bias(bias), gelu(gelu), y(y), M(M), N(N) {}

  int pieces() const { return gelu ? 4 * (kGeluPieces + 1) : 4; }

  // Pieces per K step that finish the epilogue within a k loop of `steps` steps.
  int per_step(int64_t steps) const {
    return static_cast<int>((pieces() + std::max<int64_t>(steps, 1) - 1) /
                            std::max<int64_t>(steps, 1));
  }

  // The next n pieces of the waiting block's epilogue (none waiting: nothing).
  __attribute__((target(ADAPERCEIVER_TILE_VEC_TARGET))) void step(int n) {
    for (; n > 0 && n0 >= 0 && done < pieces(); --n, ++done) {
      const int t = gelu ? done / (kGeluPieces + 1) : done;
      const int64_t on = n0 + (t >> 1) * 16, om = m0 + (t & 1) * 16;
      const int64_t rows = std::min<int64_t>(16, M - om), cols = std::min<int64_t>(16, N - on);
      if (rows <= 0 || cols <= 0) continue;  // a tile past M or N
      const int j = gelu ? done % (kGeluPieces + 1) : 0;
      if (j < kGeluPieces && gelu) {
        const int v = 256 / kGeluPieces;
        bias_gelu_row(c[t] + j * v, bias_tiles[t >> 1] + j * v, v);
      } else {  // with gelu, c[t] already holds GELU(sum + bias)
        store_tile(c[t], gelu || !bias ? nullptr : bias + on, y + om * N + on, N, rows, cols);
      }
    }
  }

  void finish() { step(pieces()); }

  // The C tiles of block (n0, m0) in, once the previous block's epilogue is done.
  __attribute__((target("amx-tile"))) void take(int64_t block_n0, int64_t block_m0) {
    finish();
    store_c_tiles(c);
    if (gelu && block_n0 != n0) {  // a C tile's row i is output block_n0 + 16 * (t / 2) + i
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 16; ++i) {
          const int64_t o = block_n0 + 16 * h + i;
          std::fill_n(bias_tiles[h] + 16 * i, 16, bias && o < N ? bias[o] : 0.f);
        }
      }
    }
    n0 = block_n0, m0 = block_m0, done = 0;
  }
};

// Four C tiles += weight tiles (a, a + 16 rows; stride lda values) times x tiles (b, b + 256).
__attribute__((target("amx-tile,amx-bf16"))) inline void tile_step(const c10::BFloat16* a,
                                                                   int64_t lda,
                                                                   const uint32_t* b) {
  _tile_loadd(4, a, lda * 2);
  _tile_loadd(6, b, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_loadd(7, b + 256, 64);
  _tile_dpbf16ps(1, 4, 7);
  _tile_loadd(5, a + 16 * lda, lda * 2);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// Software prefetch (into L2) of the next output block's weight rows, a few cache lines per K
// step of the current block, in the order its K steps read them: at a few hundred rows the
// weight comes from memory once per call, and the hardware prefetchers, following 32 strided
// rows at once, leave much of the memory bandwidth unused. Only when the current block's K
// steps take the next block's rows at most 6 lines a step (about 192 rows or more): with fewer
// rows its products are too short to hide the fetch, and the extra loads slowed it.
struct NextRowsPrefetch {
  static constexpr int64_t kMaxLinesPerStep = 6;
  int64_t rows = 0, ld = 0, lines = 0, next = 0, per_step = 0;  // ld in bytes
  const char* column = nullptr;  // the line of row 0 at the next line's column
  int64_t row = 0;               // the next line's row

  // rows (ld bytes apart, row_bytes each) to be fetched over `steps` calls of step()
  void start(const void* p, int64_t nrows, int64_t ld_bytes, int64_t row_bytes, int64_t steps) {
    column = static_cast<const char*>(p), rows = nrows, ld = ld_bytes, next = row = 0;
    lines = nrows * ((row_bytes + 63) / 64);
    const int64_t s = std::max<int64_t>(steps, 1);
    per_step = (lines + s - 1) / s;
    if (per_step > kMaxLinesPerStep) lines = 0;
  }
  // the next per_step lines, row by row within a column of lines (counters, not a division
  // per line: this runs in every K step)
  void step() {
    for (int64_t i = 0; i < per_step && next < lines; ++i, ++next) {
      _mm_prefetch(column + row * ld, _MM_HINT_T1);
      if (++row == rows) row = 0, column += 64;
    }
  }
};

// The products of output blocks [nb0, nb1) (32 outputs each) on every row: the parallel loop's
// body (a lambda would not carry the target).
struct Problem {
  const c10::BFloat16* w;  // weight rows, stride lda
  int64_t lda, M, N, K, Kp, Kfull, mblocks;
  const uint32_t* xv;      // packed x
  const float* bias;       // float32, or null
  bool gelu;               // the exact GELU of (sum + bias) before the rounding
  c10::BFloat16* y;        // M x N
  // with RowExtents (kOutputs), per 32-row block: output blocks from here on are not computed;
  // else null
  const int64_t* block_outputs;
};

__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16,avx512bw,avx512vl"))) void
output_blocks(const Problem& p, int64_t nb0, int64_t nb1) {
  load_tile_config();
  const int64_t Mp = p.mblocks * 16;
  alignas(64) c10::BFloat16 ktail[32 * 32];  // the last K step's columns, zero-padded
  std::vector<c10::BFloat16> ntail;          // a last block of < 32 outputs, zero-padded
  PendingBlock<c10::BFloat16> pend(p.bias, p.gelu, p.y, p.M, p.N);
  NextRowsPrefetch prefetch;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int64_t n0 = nb * 32, nr = std::min<int64_t>(32, p.N - n0);
    const c10::BFloat16* a = p.w + n0 * p.lda;
    // the next block's rows (none after the last)
    prefetch.start(a + 32 * p.lda, nb + 1 < nb1 ? std::min<int64_t>(32, p.N - n0 - 32) : 0,
                   p.lda * 2, p.K * 2, (Mp / 32) * (p.Kp / 32));
    int64_t ld = p.lda, kmain = p.Kfull;
    if (nr < 32) {  // the last outputs: rows past N read as zeros, every K step from ntail
      ntail.assign(32 * p.Kp, c10::BFloat16(0.f));
      for (int64_t i = 0; i < nr; ++i) {
        std::copy(a + i * p.lda, a + i * p.lda + p.K, &ntail[i * p.Kp]);
      }
      a = ntail.data(), ld = p.Kp, kmain = p.Kp;
    } else if (p.Kfull < p.K) {
      std::fill(ktail, ktail + 32 * 32, c10::BFloat16(0.f));
      for (int64_t i = 0; i < 32; ++i) {
        std::copy(a + i * p.lda + p.Kfull, a + i * p.lda + p.K, ktail + i * 32);
      }
    }
    // the tile loads are asm with no memory operand: keep the copies above before them
    asm volatile("" ::: "memory");
    for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
      if (p.block_outputs && n0 >= p.block_outputs[m0 / 32]) continue;  // past every extent
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint32_t* b = p.xv + (m0 / 16) * 256;
      const int per_step = pend.per_step(kmain / 32);
      for (int64_t k = 0; k < kmain; k += 32) {
        tile_step(a + k, ld, b + (k / 32) * p.mblocks * 256);
        pend.step(per_step);
        prefetch.step();
      }
      if (kmain < p.Kp) tile_step(ktail, 32, b + (kmain / 32) * p.mblocks * 256);
      pend.take(n0, m0);
    }
  }
  pend.finish();
  _tile_release();
}

void tile_linear_kernel(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w,
                        int64_t lda, int64_t N, const float* bias, bool gelu, c10::BFloat16* y,
                        const RowExtents* extents) {
  const int64_t Mp = (M + 31) / 32 * 32, Kp = (K + 31) / 32 * 32;
  const int64_t ksteps = Kp / 32, mblocks = Mp / 16, nblocks = (N + 31) / 32;
  const bool by_outputs = extents && extents->kind == RowExtents::kOutputs;
  const bool by_inner = extents && extents->kind == RowExtents::kInner;
  // output extents: each 32-row block computes up to the largest extent of its rows
  std::vector<int64_t> block_ext;
  if (by_outputs) {
    block_ext.assign(Mp / 32, 0);
    for (int64_t m = 0; m < M; ++m) {
      block_ext[m / 32] = std::max(block_ext[m / 32], extents->ext[m]);
    }
  }
  const at::Tensor xv_t = at::empty({ksteps * mblocks * 256}, at::kInt);  // the packed x
  uint32_t* xv = reinterpret_cast<uint32_t*>(xv_t.data_ptr());
  at::parallel_for(0, mblocks, 1, [&](int64_t b0, int64_t b1) {
    pack_x_blocks(x, M, K, K, ksteps, mblocks, b0, b1, by_inner ? extents->ext : nullptr, xv);
  });
  const Problem p{w, lda, M, N, K, Kp, K / 32 * 32, mblocks, xv, bias, gelu, y,
                  by_outputs ? block_ext.data() : nullptr};
  if (!by_outputs) {
    at::parallel_for(0, nblocks, 1, [&](int64_t nb0, int64_t nb1) { output_blocks(p, nb0, nb1); });
    return;
  }
  // output extents: the last output blocks run on fewer row blocks, so the threads take
  // consecutive output blocks of equal work (row blocks computed), not of equal count
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  std::vector<int64_t> work(nblocks + 1, 0);  // prefix sums
  for (int64_t nb = 0; nb < nblocks; ++nb) {
    int64_t w_nb = 0;
    for (const int64_t e : block_ext) w_nb += nb * 32 < e;
    work[nb + 1] = work[nb] + w_nb;
  }
  std::vector<int64_t> bound(T + 1, nblocks);
  bound[0] = 0;
  for (int64_t t = 1, nb = 0; t < T; ++t) {
    while (nb < nblocks && work[nb] * T < work[nblocks] * t) ++nb;
    bound[t] = nb;
  }
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) output_blocks(p, bound[t], bound[t + 1]);
  });
}

// ---- float16 as pairs of bfloat16 (see the file's comment) ----

// 32 float16 values (lanes past km: 0) split into hi = bf16(v) and lo = bf16(v - hi), each 32
// bfloat16; true when a lane holds inf or NaN (exponent bits all ones)
__attribute__((target(ADAPERCEIVER_TILE_VEC_TARGET))) inline bool split32(
    const c10::Half* p, __mmask32 km, __m512i* hi, __m512i* lo) {
  const __m512i h = _mm512_maskz_loadu_epi16(km, p);
  const __m512i exp_bits = _mm512_set1_epi16(0x7C00);
  const bool nonfinite =
      _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, exp_bits), exp_bits) != 0;
  const __m512 a = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  const __m512 b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
  const __m512i hb = (__m512i)_mm512_cvtne2ps_pbh(b, a);
  const __m512 ah = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hb)), 16));
  const __m512 bh = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hb, 1)), 16));
  *hi = hb;
  *lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, bh), _mm512_sub_ps(a, ah));
  return nonfinite;
}

// x (M x K, row stride K) split and packed into xh / xl: block (16-row block mb, k step s) at
// (mb * ksteps + s) * 256, laid out as pack_x_blocks lays a block; zeros past K and M. Row
// blocks [mb0, mb1); bad_row[m] set for the rows that hold inf or NaN (rows past M load as
// zeros, so only rows below M are ever set).
__attribute__((target(ADAPERCEIVER_TILE_VEC_TARGET))) void pack_x_split(
    const c10::Half* x, int64_t M, int64_t K, int64_t ksteps, int64_t mb0, int64_t mb1,
    uint32_t* xh, uint32_t* xl, uint8_t* bad_row) {
  for (int64_t mb = mb0; mb < mb1; ++mb) {
    for (int64_t s = 0; s < ksteps; ++s) {
      const __mmask32 km = lanes32_below(K, s * 32);
      __m512i rh[16], rl[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = mb * 16 + i;
        if (split32(x + m * K + s * 32, m < M ? km : 0, &rh[i], &rl[i])) bad_row[m] = 1;
      }
      transpose16x16(rh);
      transpose16x16(rl);
      uint32_t* bh = xh + (mb * ksteps + s) * 256;
      uint32_t* bl = xl + (mb * ksteps + s) * 256;
      for (int i = 0; i < 16; ++i) {
        _mm512_storeu_si512(bh + 16 * i, rh[i]);
        _mm512_storeu_si512(bl + 16 * i, rl[i]);
      }
    }
  }
}

// weight rows [n0, n0 + 32) (those below N; row stride lda, K values) split into the panels ph /
// pl: k step s at s * 1024 holds 32 rows of 32 values (two 16-row tiles, 64-byte rows); zeros
// past N and K. bad_out[n] set for the rows (outputs) that hold inf or NaN.
__attribute__((target(ADAPERCEIVER_TILE_VEC_TARGET))) void split_panel(
    const c10::Half* w, int64_t lda, int64_t N, int64_t K, int64_t n0, int64_t ksteps,
    c10::BFloat16* ph, c10::BFloat16* pl, uint8_t* bad_out) {
  for (int64_t s = 0; s < ksteps; ++s) {
    const __mmask32 km = lanes32_below(K, s * 32);
    for (int64_t r = 0; r < 32; ++r) {
      __m512i h, l;
      if (split32(w + (n0 + r) * lda + s * 32, n0 + r < N ? km : 0, &h, &l)) bad_out[n0 + r] = 1;
      _mm512_storeu_si512(ph + s * 1024 + r * 32, h);
      _mm512_storeu_si512(pl + s * 1024 + r * 32, l);
    }
  }
}

// The weight tiles (4, 5) and the x tiles (6, 7), each from two blocks of 16 rows of 64 bytes
// (the tile number is part of the instruction, so one function per pair).
__attribute__((target("amx-tile"))) inline void load_weight_tiles(const void* p0, const void* p1) {
  _tile_loadd(4, p0, 64);
  _tile_loadd(5, p1, 64);
}
__attribute__((target("amx-tile"))) inline void load_x_tiles(const void* p0, const void* p1) {
  _tile_loadd(6, p0, 64);
  _tile_loadd(7, p1, 64);
}

// The four C tiles += weight tiles 4, 5 times x tiles 6, 7.
__attribute__((target("amx-tile,amx-bf16"))) inline void dot2x2() {
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

struct HalfProblem {
  const c10::Half* w;       // weight rows, stride lda
  int64_t lda, M, N, K, ksteps, mblocks;
  const uint32_t *xh, *xl;  // x's halves, packed
  const float* bias;        // float32, or null
  bool gelu;                // the exact GELU of (sum + bias) before the rounding
  c10::Half* y;             // M x N
  uint8_t* bad_out;         // N flags: the weight row holds inf or NaN
};

// Output blocks [nb0, nb1) of 32 (the parallel loop's body): per block the weight panel is split,
// then per 32 rows four C tiles take, per K step, hi hi + hi lo + lo lo + lo hi (the x tiles of
// the second product kept for the third, the weight's lo tiles for the fourth). The epilogue of
// a block's C tiles runs in the next block's k loop, as in output_blocks.
__attribute__((target("amx-tile,amx-bf16," ADAPERCEIVER_TILE_VEC_TARGET))) void
half_output_blocks(const HalfProblem& p, int64_t nb0, int64_t nb1) {
  load_tile_config();
  std::vector<c10::BFloat16> panels(p.ksteps * 2048 + 32);
  c10::BFloat16* ph = reinterpret_cast<c10::BFloat16*>(
      (reinterpret_cast<uintptr_t>(panels.data()) + 63) & ~uintptr_t(63));
  c10::BFloat16* pl = ph + p.ksteps * 1024;
  PendingBlock<c10::Half> pend(p.bias, p.gelu, p.y, p.M, p.N);
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int64_t n0 = nb * 32;
    split_panel(p.w, p.lda, p.N, p.K, n0, p.ksteps, ph, pl, p.bad_out);
    // the tile loads are asm with no memory operand: keep the panel's stores before them
    asm volatile("" ::: "memory");
    for (int64_t m0 = 0; m0 < p.mblocks * 16; m0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint32_t* bh0 = p.xh + (m0 / 16) * p.ksteps * 256;
      const uint32_t* bh1 = bh0 + p.ksteps * 256;
      const uint32_t* bl0 = p.xl + (m0 / 16) * p.ksteps * 256;
      const uint32_t* bl1 = bl0 + p.ksteps * 256;
      const int per_step = pend.per_step(p.ksteps);
      for (int64_t s = 0; s < p.ksteps; ++s) {
        const c10::BFloat16 *ah = ph + s * 1024, *al = pl + s * 1024;
        load_weight_tiles(ah, ah + 512);
        load_x_tiles(bh0 + s * 256, bh1 + s * 256);
        dot2x2();  // hi hi
        load_x_tiles(bl0 + s * 256, bl1 + s * 256);
        dot2x2();  // hi lo
        load_weight_tiles(al, al + 512);
        dot2x2();  // lo lo
        load_x_tiles(bh0 + s * 256, bh1 + s * 256);
        dot2x2();  // lo hi
        pend.step(per_step);
      }
      pend.take(n0, m0);
    }
  }
  pend.finish();
  _tile_release();
}

// y = x w^T + bias (optionally GELU'd) in float16 through the split. bad_row (M) and bad_out
// (N, zeroed by the caller) flag the rows of x and of the weight that hold inf or NaN: their
// outputs, every one of them inf or NaN in the product, are not exact here (the caller
// recomputes them); every other output is.
void half_linear_kernel(const c10::Half* x, int64_t M, int64_t K, const c10::Half* w, int64_t lda,
                        int64_t N, const float* bias, bool gelu, c10::Half* y, uint8_t* bad_row,
                        uint8_t* bad_out) {
  const int64_t Mp = (M + 31) / 32 * 32, ksteps = (K + 31) / 32, mblocks = Mp / 16;
  const at::Tensor xs = at::empty({2, ksteps * mblocks * 256}, at::kInt);  // x's halves
  uint32_t* xh = reinterpret_cast<uint32_t*>(xs.data_ptr());
  uint32_t* xl = xh + ksteps * mblocks * 256;
  at::parallel_for(0, mblocks, 1, [&](int64_t b0, int64_t b1) {
    pack_x_split(x, M, K, ksteps, b0, b1, xh, xl, bad_row);
  });
  const HalfProblem p{w, lda, M, N, K, ksteps, mblocks, xh, xl, bias, gelu, y, bad_out};
  at::parallel_for(0, (N + 31) / 32, 1,
                   [&](int64_t nb0, int64_t nb1) { half_output_blocks(p, nb0, nb1); });
}
#endif

}  // namespace

std::string tile_linear_why_not(int64_t rows, at::ScalarType dtype, bool row_extents) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    return std::string(c10::toString(dtype)) +
           " (the tiles' GEMM multiplies bfloat16, and float16 as bfloat16 pairs)";
  }
  const int64_t max_rows = row_extents ? kTileLinearMaxRowsExtents : kTileLinearMaxRows;
  if (dtype == at::kBFloat16 && (rows < 1 || rows > max_rows)) {
    return std::to_string(rows) + " rows (it runs 1.." + std::to_string(max_rows) +
           " in bfloat16" + (row_extents ? " with row extents)" : ")");
  }
  if (rows < 1) return std::to_string(rows) + " rows (it runs 1 or more)";
  if (!onednn_linear_available()) return "oneDNN is off, and the rest of the model's GEMMs with it";
  std::string why = tiles_why_not(at::kBFloat16, 64, 64);
  if (!why.empty()) return why;
  if (dtype == at::kHalf && tiles_why_not(at::kHalf, 64, 64).empty()) {
    return "this CPU multiplies float16 on AMX-FP16 tiles (oneDNN's GEMM, faster than bfloat16 "
           "pairs)";
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (!tile_state_granted()) return "Linux did not grant this process the AMX tile state";
  return "";
#else
  return "not an x86-64 build";
#endif
}

bool tile_linear_takes(int64_t rows, at::ScalarType dtype, bool row_extents) {
  return tile_linear_why_not(rows, dtype, row_extents).empty();
}

at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& weight, const OptT& bias,
                       PostOp post_op, const RowExtents* extents) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!bias || bias->device().is_cpu()),
              "tile_linear: CPU tensors only, got x on ", x.device(), " and weight on ",
              weight.device());
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1),
              "tile_linear: x (..., K) and weight (N, K) expected, got x ", x.sizes(),
              " and weight ", weight.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "tile_linear: bias of weight.size(0) = ", weight.size(0), " values expected, got ",
              bias->sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() &&
                  (!bias || bias->scalar_type() == x.scalar_type()),
              "tile_linear: x, weight and bias must share a dtype, got ", x.scalar_type(), ", ",
              weight.scalar_type(),
              bias ? std::string(", ") + c10::toString(bias->scalar_type()) : "");
  TORCH_CHECK(!(at::GradMode::is_enabled() &&
                (x.requires_grad() || weight.requires_grad() || (bias && bias->requires_grad()))),
              "tile_linear has no gradient formula and an input requires grad (ops.linear takes "
              "F.linear when a gradient is recorded)");
  const bool gelu = post_op == PostOp::kGelu;
  TORCH_CHECK(!extents || x.scalar_type() == at::kBFloat16,
              "tile_linear: row extents are bfloat16's only, got ", x.scalar_type());
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  const std::string why = tile_linear_why_not(M, x.scalar_type(), extents != nullptr);
  TORCH_CHECK(why.empty(), "tile_linear cannot take this call: ", why);
  if (K == 0) {  // an empty sum: the bias
    y.view({M, N}).copy_(bias ? bias->expand({M, N}) : at::zeros({M, N}, x.options()));
    return gelu ? at::gelu(y) : y;
  }
  // the weight's rows must be unit-stride; a column slice (row stride above K) runs in place
  const at::Tensor w =
      weight.stride(1) == 1 && weight.stride(0) >= K ? weight : weight.contiguous();
  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const at::Tensor bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
#if defined(__x86_64__) && defined(__GNUC__)
  if (x.scalar_type() == at::kHalf) {
    std::vector<uint8_t> bad_row(M, 0), bad_out(N, 0);
    // rows in chunks, so that x's packed halves (4 bytes a value) stay a bounded scratch; every
    // output is computed the same way in any chunk
    for (int64_t r0 = 0; r0 < M; r0 += kHalfRowChunk) {
      half_linear_kernel(xc.data_ptr<c10::Half>() + r0 * K, std::min(kHalfRowChunk, M - r0), K,
                         w.data_ptr<c10::Half>(), w.stride(0), N,
                         bias ? bf.data_ptr<float>() : nullptr, gelu,
                         y.data_ptr<c10::Half>() + r0 * N, bad_row.data() + r0, bad_out.data());
    }
    // rows of x and of the weight with inf or NaN: their outputs (all inf or NaN) by oneDNN's
    // float16 GEMM, which propagates them as the product does (the split would turn inf into
    // NaN); the other outputs stay the tile GEMM's, whatever else the batch holds
    const auto flagged = [](const std::vector<uint8_t>& bad) {
      std::vector<int64_t> ids;
      for (size_t i = 0; i < bad.size(); ++i)
        if (bad[i]) ids.push_back(static_cast<int64_t>(i));
      return at::tensor(ids, at::kLong);
    };
    at::Tensor y2 = y.view({M, N});
    const at::Tensor outs = flagged(bad_out), rows = flagged(bad_row);
    if (outs.numel() > 0) {
      const OptT b_outs = bias ? OptT(bias->index_select(0, outs)) : OptT();
      y2.index_copy_(1, outs, *onednn_linear(xc, w.index_select(0, outs), b_outs, post_op));
    }
    if (rows.numel() > 0) {
      y2.index_copy_(0, rows, *onednn_linear(xc.index_select(0, rows), w, bias, post_op));
    }
    return y;
  }
  tile_linear_kernel(xc.data_ptr<c10::BFloat16>(), M, K, w.data_ptr<c10::BFloat16>(), w.stride(0),
                     N, bias ? bf.data_ptr<float>() : nullptr, gelu, y.data_ptr<c10::BFloat16>(),
                     extents);
#endif
  return y;
}

}  // namespace cpu
}  // namespace adaperceiver
