// The CUDA implementations of the adaperceiver::* backend ops (cuda/attention.cu, cuda/ffn.cu;
// the FFN backward runs the banded ATen path shared with the CPU, ordered on the device). A
// plain C++ file: registering needs only the torch headers, which the host compiler parses
// faster than nvcc.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(adaperceiver, CUDA, m) { ADAPERCEIVER_IMPL_OP_KERNELS(m, cuda) }
