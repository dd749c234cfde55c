// Fused per-token KV deviation score: score[t] = sum_{h,d} (kf - kc)^2 (+ (vf - vc)^2).
// Raw-pointer kernels, no torch headers. One warp per token; each token's H*D values
// form one dense row (row stride free), read once with 16-byte loads when aligned,
// so the kernel runs at memory bandwidth.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace kvplug {
namespace deviation {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

struct Rows {
  const void* ptr;
  int64_t stride;  // elements between consecutive tokens
};

// Sum of squared differences of 16 bytes of a and 16 bytes of b (VEC path).
template <typename T>
__device__ __forceinline__ float sq_diff_16B(const uint4& a, const uint4& b) {
  constexpr int N = 16 / sizeof(T);
  const T* pa = reinterpret_cast<const T*>(&a);
  const T* pb = reinterpret_cast<const T*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = to_float(pa[i]) - to_float(pb[i]);
    s = fmaf(d, d, s);
  }
  return s;
}

// This lane's share of sum (a - b)^2 over one row of F elements.
// VEC: F * sizeof(T) % 16 == 0 and both row starts 16-byte aligned (checked by the launcher).
template <typename T, bool VEC>
__device__ __forceinline__ float row_sq_diff(const T* a, const T* b, int64_t F, int lane) {
  float s = 0.f;
  if (VEC) {
    constexpr int N = 16 / sizeof(T);
    const uint4* va = reinterpret_cast<const uint4*>(a);
    const uint4* vb = reinterpret_cast<const uint4*>(b);
    for (int64_t i = lane; i < F / N; i += 32) s += sq_diff_16B<T>(__ldg(va + i), __ldg(vb + i));
  } else {
    for (int64_t i = lane; i < F; i += 32) {
      const float d = to_float(a[i]) - to_float(b[i]);
      s = fmaf(d, d, s);
    }
  }
  return s;
}

// grid: ceil(T / warps_per_block), block: 32 * warps_per_block. out: fp32 [T].
template <typename T, bool VEC, bool HAS_V>
__global__ void deviation_score_kernel(Rows kf, Rows kc, Rows vf, Rows vc, float* __restrict__ out,
                                       int64_t num_tokens, int64_t F) {
  const int lane = threadIdx.x & 31;
  const int64_t t = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= num_tokens) return;  // whole warp leaves together: t is uniform per warp
  const T* a = static_cast<const T*>(kf.ptr) + t * kf.stride;
  const T* b = static_cast<const T*>(kc.ptr) + t * kc.stride;
  float s = row_sq_diff<T, VEC>(a, b, F, lane);
  if (HAS_V) {
    a = static_cast<const T*>(vf.ptr) + t * vf.stride;
    b = static_cast<const T*>(vc.ptr) + t * vc.stride;
    s += row_sq_diff<T, VEC>(a, b, F, lane);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) out[t] = s;
}

}  // namespace deviation
}  // namespace kvplug
