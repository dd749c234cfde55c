// GQA query x centroid scores: out[q, h, c] = scale * queries[q, h] . centroids[h / group, c]
// in fp32. Raw-pointer kernel, no torch headers. A block owns one (query, head) row and
// kCentroidsPerBlock centroids; the query row is staged in shared memory as fp32, each
// warp walks its centroids with coalesced lane-strided loads and a shuffle reduction.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace kvplug {
namespace centroid {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

constexpr int kWarps = 8;
constexpr int kCentroidsPerBlock = 64;

// grid (Q * Hq, ceil(C / kCentroidsPerBlock)), block 32 * kWarps, dynamic smem D floats.
// queries: row (q, h) at q * s_qq + h * s_qh, unit stride along D; centroids contiguous
// [Hkv, C, D]; out contiguous fp32 [Q, Hq, C].
template <typename TQ, typename TC>
__global__ void __launch_bounds__(32 * kWarps)
centroid_scores_kernel(const TQ* __restrict__ queries, const TC* __restrict__ centroids,
                       float* __restrict__ out, int64_t Hq, int64_t group, int64_t C, int D,
                       int64_t s_qq, int64_t s_qh, float scale) {
  extern __shared__ float qs[];
  const int64_t row = blockIdx.x, q = row / Hq, h = row % Hq, kv = h / group;
  const TQ* qrow = queries + q * s_qq + h * s_qh;
  for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = to_float(qrow[d]);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c_begin = (int64_t)blockIdx.y * kCentroidsPerBlock;
  for (int i = warp; i < kCentroidsPerBlock; i += kWarps) {
    const int64_t c = c_begin + i;
    if (c >= C) break;  // uniform per warp
    const TC* crow = centroids + (kv * C + c) * D;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s = fmaf(qs[d], to_float(crow[d]), s);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[row * C + c] = s * scale;
  }
}

}  // namespace centroid
}  // namespace kvplug
