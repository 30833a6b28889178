// The Python module adaperceiver._C: loading it registers the ops (ops.cpp); build_info() returns
// the compile-time facts as a dict of strings. Not part of the CMake build (no Python there).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adaperceiver compiled kernels (ops live in torch.ops.adaperceiver)";
  m.def("build_info", [] {
    pybind11::dict d;
    for (const auto& kv : adaperceiver::build_facts()) d[kv.first.c_str()] = kv.second;
    return d;
  }, "Compile-time facts of this build (strings).");
}
