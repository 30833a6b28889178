// Compile-time facts of the build, (key, value) strings: declared apart from kernels.h so that the
// Python module (python_module.cpp) and the CUDA facts (cuda/build_facts.cu) compile without the
// torch headers.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace adaperceiver {

std::vector<std::pair<std::string, std::string>> build_facts();  // ops.cpp

#if ADAPERCEIVER_WITH_CUDA
namespace cuda {
std::vector<std::pair<std::string, std::string>> build_facts();  // cuda/build_facts.cu
}
#endif

}  // namespace adaperceiver
