// Host-known int32 index vectors (a mask's row_end, a packed batch's lengths and row starts, a
// mixed batch's FFN widths and its backward's widest-first order) as device tensors, built once
// per (device, values) and reused: a repeated configuration makes no host-to-device copy, so its
// forward can be captured in a CUDA graph (where a pageable copy is not allowed) and spends no
// host time on copies. The memo is keyed by the values, never by call history, and the kernels
// only read these tensors, so no entry can become stale. The map is never destroyed (its
// tensors would otherwise be freed after the CUDA allocator at process exit); it is cleared
// when it holds kMaxEntries.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace adaperceiver {
namespace cuda {

inline at::Tensor device_ints(const std::vector<int32_t>& values, const at::Device& dev) {
  constexpr size_t kMaxEntries = 4096;
  // (device index, under a Python dispatch mode, values): a tensor made under a mode (a fake
  // tensor of tests/test_gpu_path.py's recorder) is never handed to a call outside one
  using Key = std::tuple<int, bool, std::vector<int32_t>>;
  static std::mutex* mu = new std::mutex();
  static auto* memo = new std::map<Key, at::Tensor>();
  std::lock_guard<std::mutex> lock(*mu);
  Key key{static_cast<int>(dev.index()),
          c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python), values};
  auto it = memo->find(key);
  if (it != memo->end()) return it->second;
  if (memo->size() >= kMaxEntries) memo->clear();
  // a view of the values (from_blob: no op, so no dispatch) copied over; the copy stages the
  // pageable bytes before it returns, so the vector may go
  const at::Tensor host = at::from_blob(const_cast<int32_t*>(values.data()),
                                        {static_cast<int64_t>(values.size())},
                                        at::TensorOptions().dtype(at::kInt));
  at::Tensor t = host_to_device(host, dev);
  memo->emplace(std::move(key), t);
  return t;
}

}  // namespace cuda
}  // namespace adaperceiver
