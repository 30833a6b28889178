// The backend-level op schemas of adaperceiver._C (namespace adaperceiver, one TORCH_LIBRARY),
// their CPU implementations, and the compile-time facts of the build.
//
// The Python side defines the user-facing custom ops (block_masked_attention, matryoshka_ffn,
// their _backward ops) in the same namespace through torch.library.custom_op, which registers
// FRAGMENTs: they coexist with this one TORCH_LIBRARY in either import order. The schemas below
// take the same arguments as those Python ops (see adaperceiver/ops/__init__.py).
#include <torch/library.h>
#include <torch/version.h>

#include "kernels.h"
#include "cpu/microkernel.h"
#include "cpu/onednn.h"

#include <exception>

#ifndef ADAPERCEIVER_WITH_CUDA
#define ADAPERCEIVER_WITH_CUDA 0
#endif

namespace adaperceiver {

std::vector<std::pair<std::string, std::string>> build_facts() {
  std::vector<std::pair<std::string, std::string>> f;
  f.emplace_back("cpp", "1");
  f.emplace_back("cuda", ADAPERCEIVER_WITH_CUDA ? "1" : "0");
  f.emplace_back("cxx_compiler",
#if defined(__clang__)
                 std::string("clang ") + __clang_version__
#elif defined(__GNUC__)
                 std::string("gcc ") + __VERSION__
#else
                 std::string("unknown")
#endif
  );
  f.emplace_back("torch_version", TORCH_VERSION);
#ifdef _OPENMP
  f.emplace_back("openmp", std::to_string(_OPENMP));
#else
  f.emplace_back("openmp", "");
#endif
#if ADAPERCEIVER_WITH_CUDA
  for (auto& kv : cuda::build_facts()) f.push_back(kv);
#endif
  // run-time facts of the CPU paths: the attention's instruction set, and whether bfloat16 /
  // float16 run natively (else they compute in float32); an invalid ADAPERCEIVER_CPU_ISA is
  // reported as the error instead
  try {
    f.emplace_back("cpu_isa", cpu::isa_name(cpu::best_isa()));
    f.emplace_back("cpu_native_bf16", cpu::native_bf16_gemm() ? "1" : "0");
    f.emplace_back("cpu_native_fp16", cpu::native_fp16_gemm() ? "1" : "0");
    f.emplace_back("cpu_attention_bf16", cpu::attention_path(at::kBFloat16));
    f.emplace_back("cpu_attention_fp16", cpu::attention_path(at::kHalf));
    f.emplace_back("cpu_attention_bwd_bf16", cpu::attention_path(at::kBFloat16));
    f.emplace_back("cpu_attention_bwd_fp16", cpu::attention_path(at::kHalf));
    f.emplace_back("cpu_attention_bf16_why_not",
                   cpu::lowp_attention_why_not(at::kBFloat16, 64, 64));
    f.emplace_back("cpu_attention_fp16_why_not", cpu::lowp_attention_why_not(at::kHalf, 64, 64));
    f.emplace_back("cpu_tile_linear_bf16",
                   cpu::tile_linear_takes(1, at::kBFloat16) ? "amx" : "onednn");
    f.emplace_back("cpu_tile_linear_fp16",
                   cpu::tile_linear_takes(1, at::kHalf) ? "amx-bf16-pairs" : "onednn");
  } catch (const std::exception& e) {
    f.emplace_back("cpu_isa_error", e.what());
  }
  return f;
}

}  // namespace adaperceiver

TORCH_LIBRARY(adaperceiver, m) {
  m.def(
      "block_masked_attention_fwd(Tensor q, Tensor k, Tensor v, int[]? token_grans, float scale, "
      "Tensor? seq_lens, Tensor? q_cos, Tensor? q_sin, Tensor? k_cos, Tensor? k_sin) "
      "-> (Tensor, Tensor)");
  m.def(
      "block_masked_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int[]? token_grans, float scale, Tensor? seq_lens, Tensor? q_cos, "
      "Tensor? q_sin, Tensor? k_cos, Tensor? k_sin) -> (Tensor, Tensor, Tensor)");
  // Self-attention over packed rows: q, k, v (R, H, D), sample b's seq_lens[b] rows after those
  // of the samples before it; out (R, H, Dv), lse (B, H, max seq_len). Its backward is the
  // padded one (adaperceiver/ops/__init__.py pads for it).
  m.def(
      "block_masked_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, int[] seq_lens, "
      "int[]? token_grans, float scale, Tensor? q_cos, Tensor? q_sin, Tensor? k_cos, "
      "Tensor? k_sin) -> (Tensor, Tensor)");
  m.def(
      "matryoshka_ffn_fwd(Tensor x, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, "
      "Tensor fc2_bias, int[] hidden) -> Tensor");
  m.def(
      "matryoshka_ffn_bwd(Tensor grad_out, Tensor x, Tensor fc1_weight, Tensor fc1_bias, "
      "Tensor fc2_weight, Tensor fc2_bias, int[] hidden) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // csrc/cpu/gemm_lowp.cpp (CPU only), used by adaperceiver/ops/linear.py: x (..., K) times
  // weight (N, K)^T plus bias as oneDNN GEMMs on row blocks of `block` rows run in parallel;
  // float32 -> bfloat16 (round to nearest even, as Tensor.to)
  m.def("linear_row_blocks(Tensor x, Tensor weight, Tensor? bias, int block) -> Tensor");
  m.def("to_bfloat16(Tensor x) -> Tensor");
  // cpu/onednn.h: how many row blocks oneDNN's 2-thread bf16 matmul of rows x outputs runs as
  // (1: one GEMM); no tensor argument, so one kernel for every dispatch key
  m.def("gemm_row_chunks(int rows, int outputs, ScalarType dtype) -> int",
        &adaperceiver::cpu::gemm_row_chunks);
  // cpu/onednn.h: rows per block of the per-thread row blocks a bfloat16 projection of rows x
  // outputs (gemm_thread_rows) or the FFN's pair on rows (ffn_thread_rows) runs as (0: one GEMM)
  m.def("gemm_thread_rows(int rows, int outputs, ScalarType dtype) -> int",
        &adaperceiver::cpu::gemm_thread_rows);
  m.def("ffn_thread_rows(int rows, ScalarType dtype) -> int", &adaperceiver::cpu::ffn_thread_rows);
  // csrc/cpu/tile_linear.cpp (CPU only), used by adaperceiver/ops/linear.py: x (..., K) times
  // weight (N, K)^T plus bias in bfloat16 (float16 as bfloat16 pairs) on AMX tiles, the weight
  // read as it is; whether (and why not) it takes a GEMM of `rows` rows in dtype (cpu/onednn.h:
  // the one statement of the rule)
  m.def("tile_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("tile_linear_why_not(int rows, ScalarType dtype) -> str",
        [](int64_t rows, at::ScalarType dtype) {
          return adaperceiver::cpu::tile_linear_why_not(rows, dtype);
        });
  // csrc/cpu/norm.cpp (CPU only), used by adaperceiver/ops/norm.py: the block's residual with
  // LayerScale, x + gamma * branch (branch given), and the LayerNorm of it (normalize), in one
  // pass; a result not asked for is an empty tensor; the norm in norm_dtype (default x's)
  m.def(
      "residual_layer_norm(Tensor x, Tensor? branch, Tensor? gamma, Tensor? weight, "
      "Tensor? bias, float eps, bool normalize, ScalarType? norm_dtype=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaperceiver, CPU, m) {
  ADAPERCEIVER_IMPL_OP_KERNELS(m, cpu)
  m.impl("linear_row_blocks", &adaperceiver::cpu::linear_row_blocks);
  m.impl("to_bfloat16", &adaperceiver::cpu::to_bfloat16);
  m.impl("tile_linear", [](const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
    return adaperceiver::cpu::tile_linear(x, weight, bias);
  });
  m.impl("residual_layer_norm", &adaperceiver::cpu::residual_layer_norm);
}
