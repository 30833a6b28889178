// float <-> the kernels' element types (float, half, bfloat16) on the device: every CUDA kernel
// here loads its inputs as float and stores its outputs in the input dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace adaperceiver {
namespace cuda {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

}  // namespace cuda
}  // namespace adaperceiver
