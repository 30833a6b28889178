// The CUDA implementations of the adaperceiver::* backend ops (cuda/attention.cu, cuda/ffn.cu;
// the FFN backward runs the banded ATen path shared with the CPU, ordered on the device). A
// plain C++ file: registering needs only the torch headers, which the host compiler parses
// faster than nvcc.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(adaperceiver, CUDA, m) {
  m.impl("block_masked_attention_fwd", &adaperceiver::cuda::attention_fwd);
  m.impl("block_masked_attention_bwd", &adaperceiver::cuda::attention_bwd);
  m.impl("block_masked_attention_varlen_fwd", &adaperceiver::cuda::attention_varlen_fwd);
  m.impl("matryoshka_ffn_fwd", &adaperceiver::cuda::ffn_fwd);
  m.impl("matryoshka_ffn_bwd", &adaperceiver::cuda::ffn_bwd);
}
