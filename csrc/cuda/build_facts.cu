// The CUDA facts of the build: the nvcc version and the architectures this file was compiled
// for (__CUDA_ARCH_LIST__, defined only by nvcc). No torch headers: nvcc compiles it in seconds.
#include <string>

#include "build_facts.h"

namespace adaperceiver {
namespace cuda {

#define ADAPERCEIVER_STR2(...) #__VA_ARGS__
#define ADAPERCEIVER_STR(...) ADAPERCEIVER_STR2(__VA_ARGS__)

std::vector<std::pair<std::string, std::string>> build_facts() {
  std::vector<std::pair<std::string, std::string>> f;
  f.emplace_back("nvcc_version", std::to_string(__CUDACC_VER_MAJOR__) + "." +
                                     std::to_string(__CUDACC_VER_MINOR__) + "." +
                                     std::to_string(__CUDACC_VER_BUILD__));
#ifdef __CUDA_ARCH_LIST__
  // e.g. "800,900" -> "8.0;9.0"
  std::string raw = ADAPERCEIVER_STR(__CUDA_ARCH_LIST__), archs;
  size_t start = 0;
  while (start < raw.size()) {
    size_t end = raw.find(',', start);
    if (end == std::string::npos) end = raw.size();
    const int a = std::stoi(raw.substr(start, end - start));
    if (!archs.empty()) archs += ";";
    archs += std::to_string(a / 100) + "." + std::to_string((a / 10) % 10);
    start = end + 1;
  }
  f.emplace_back("cuda_archs", archs);
#else
  f.emplace_back("cuda_archs", "");
#endif
  return f;
}

}  // namespace cuda
}  // namespace adaperceiver
