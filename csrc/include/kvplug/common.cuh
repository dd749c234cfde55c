// Small device helpers shared by kvplug's CUDA kernels; raw types only, no torch headers.
//   to_float(x) / from_float<T>(f)   fp32 <-> float, __half, __nv_bfloat16
//   sincos_reduced(angle, &s, &c)     sin/cos accurate for large angles even under --use_fast_math
//   PagedView / paged_row(view, slot) element offset of a token slot's row in a paged K or V view
//   ceil_div(a, b)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace kvplug {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// setup.py builds with --use_fast_math, which turns sinf/cosf into __sinf/__cosf: those
// lose all accuracy for |x| >> pi (RoPE angles reach 1e4+ rad). Reducing to [-pi, pi]
// first keeps the error ~1e-6. Cody-Waite: k * kTwoPiHi is exact in fp32 for |k| < 2^16.
__device__ __forceinline__ void sincos_reduced(float angle, float* s, float* c) {
  constexpr float kInvTwoPi = 0.15915494309189535f;
  constexpr float kTwoPiHi = 6.28125f;
  constexpr float kTwoPiLo = 0.0019353071795864769f;
  const float k = rintf(angle * kInvTwoPi);
  float r = fmaf(-k, kTwoPiHi, angle);
  r = fmaf(-k, kTwoPiLo, r);
  __sincosf(r, s, c);
}

// One paged K or V view [num_blocks, block_size, H, D]; strides in units of the element
// (or vector) type the kernel indexes with. head_dim is contiguous.
struct PagedView {
  int64_t block_size;
  int64_t stride_block;
  int64_t stride_token;
  int64_t stride_head;
};

// Offset of slot's (block, offset) row; the caller has checked 0 <= slot < nb * bs.
__device__ __forceinline__ int64_t paged_row(const PagedView& v, int64_t slot) {
  return (slot / v.block_size) * v.stride_block + (slot % v.block_size) * v.stride_token;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kvplug
