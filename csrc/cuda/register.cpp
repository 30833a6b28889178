// The CUDA implementations of the adaperceiver::* backend ops (cuda/attention.cu, cuda/ffn.cu,
// and the banded FFN backward shared with the CPU). A plain C++ file: registering needs only
// the torch headers, which the host compiler parses faster than nvcc.
#include <torch/library.h>

#include "ffn_banded.h"
#include "kernels.h"

TORCH_LIBRARY_IMPL(adaperceiver, CUDA, m) {
  m.impl("block_masked_attention_fwd", &adaperceiver::cuda::attention_fwd);
  m.impl("block_masked_attention_bwd", &adaperceiver::cuda::attention_bwd);
  m.impl("block_masked_attention_varlen_fwd", &adaperceiver::cuda::attention_varlen_fwd);
  m.impl("matryoshka_ffn_fwd", &adaperceiver::cuda::ffn_fwd);
  m.impl("matryoshka_ffn_bwd", &adaperceiver::ffn_bwd_banded);
}
