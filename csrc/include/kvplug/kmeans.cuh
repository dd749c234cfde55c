// One Lloyd step of per-head k-means on keys [T, H, D] (dense [H, D] rows, any token
// stride) with fp32 centroids [H, C, D]. Raw-pointer kernels, no torch headers.
//   assign_kernel        nearest centroid per (head, token), lowest index on exact ties
//   segment_mean_kernel  member means per (head, cluster) from a stable sort of the
//                        assignment; a fixed summation order makes it deterministic
//                        (no float atomics), and it serves merge_clusters too (NSRC = 2).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace kvplug {
namespace kmeans {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// assign_kernel tiling: a block owns kTokens tokens of one head; its 256 threads are
// kTokens tokens x kGroups centroid groups; each centroid tile of kTileC is split
// kTileC / kGroups per thread. Shared: x^T [D][kTokens + 1] and tile [kTileC][D + 1]
// (+1 pads keep the transposed stores and the c^2 loop free of bank conflicts).
constexpr int kTokens = 64;
constexpr int kGroups = 4;
constexpr int kTileC = 16;
constexpr int kPerThread = kTileC / kGroups;
constexpr int kAssignThreads = kTokens * kGroups;

// The final candidate reduction reuses the front of the buffer for kAssignThreads
// (float, int64) pairs, hence the floor.
__host__ __device__ inline int64_t assign_smem_bytes(int64_t D) {
  const int64_t tiles = (D * (kTokens + 1) + kTileC * (D + 1) + kTileC) * (int64_t)sizeof(float);
  const int64_t reduce = kAssignThreads * (int64_t)(sizeof(float) + sizeof(int64_t));
  return tiles > reduce ? tiles : reduce;
}

// grid (ceil(T / kTokens), H), block kAssignThreads, dynamic smem assign_smem_bytes(D).
template <typename T>
__global__ void __launch_bounds__(kAssignThreads)
assign_kernel(const T* __restrict__ x, const float* __restrict__ cen, int64_t* __restrict__ assign,
              int64_t num_tokens, int64_t C, int D, int64_t s_t, int64_t s_h) {
  extern __shared__ float smem[];
  float* xs = smem;                               // [D][kTokens + 1]
  float* cs = xs + (int64_t)D * (kTokens + 1);    // [kTileC][D + 1]
  float* c2 = cs + kTileC * (D + 1);              // [kTileC]
  const int tid = threadIdx.x, tok = tid % kTokens, grp = tid / kTokens;
  const int64_t h = blockIdx.y, t0 = (int64_t)blockIdx.x * kTokens;
  for (int i = tid; i < kTokens * D; i += kAssignThreads) {
    const int tt = i / D, d = i % D;  // consecutive i -> consecutive d: coalesced reads
    xs[d * (kTokens + 1) + tt] = (t0 + tt < num_tokens) ? to_float(x[(t0 + tt) * s_t + h * s_h + d]) : 0.f;
  }
  float best = INFINITY;
  int64_t best_i = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
    __syncthreads();  // xs ready (first pass); previous tile no longer read
    for (int i = tid; i < kTileC * D; i += kAssignThreads) {
      const int j = i / D, d = i % D;
      cs[j * (D + 1) + d] = (c0 + j < C) ? cen[(h * C + c0 + j) * D + d] : 0.f;
    }
    __syncthreads();
    if (tid < kTileC) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s = fmaf(cs[tid * (D + 1) + d], cs[tid * (D + 1) + d], s);
      c2[tid] = s;
    }
    __syncthreads();
    float acc[kPerThread] = {};
    const float* my_c = cs + grp * kPerThread * (D + 1);
    for (int d = 0; d < D; ++d) {
      const float xv = xs[d * (kTokens + 1) + tok];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[j] = fmaf(xv, my_c[j * (D + 1) + d], acc[j]);
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t c = c0 + grp * kPerThread + j;
      const float dist = c2[grp * kPerThread + j] - 2.f * acc[j];
      if (c < C && dist < best) { best = dist; best_i = c; }  // ascending c: strict < keeps the lowest
    }
  }
  // Reduce the kGroups candidates per token; reuse xs (all reads of it are done).
  __syncthreads();
  float* bd = xs;
  int64_t* bi = reinterpret_cast<int64_t*>(xs + kAssignThreads);  // 1 KiB in: 8-byte aligned
  bd[tid] = best;
  bi[tid] = best_i;
  __syncthreads();
  if (grp == 0 && t0 + tok < num_tokens) {
    for (int g = 1; g < kGroups; ++g) {
      const float d = bd[g * kTokens + tok];
      const int64_t i = bi[g * kTokens + tok];
      if (d < best || (d == best && i < best_i)) { best = d; best_i = i; }
    }
    assign[h * num_tokens + t0 + tok] = best_i;
  }
}

// grid (H * C), block >= 32 threads striding over D. order [H, T] lists the tokens of
// cluster c of head h at offsets[h, c] .. + sizes[h, c]. out_s [H, C, D]: mean of src_s
// over the members; an empty cluster gets old[h, c] when old != nullptr, else 0.
template <typename T, typename OutT, int NSRC>
__global__ void segment_mean_kernel(const T* __restrict__ src0, const T* __restrict__ src1,
                                    OutT* __restrict__ out0, OutT* __restrict__ out1,
                                    const float* __restrict__ old, const int64_t* __restrict__ order,
                                    const int64_t* __restrict__ offsets, const int64_t* __restrict__ sizes,
                                    int64_t num_tokens, int64_t C, int D, int64_t s_t, int64_t s_h) {
  const int64_t hc = blockIdx.x, h = hc / C;
  const int64_t n = sizes[hc], start = offsets[hc];
  const int64_t* members = order + h * num_tokens + start;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a0 = 0.f, a1 = 0.f;
    for (int64_t m = 0; m < n; ++m) {
      const int64_t off = members[m] * s_t + h * s_h + d;
      a0 += to_float(src0[off]);
      if (NSRC == 2) a1 += to_float(src1[off]);
    }
    const int64_t o = hc * D + d;
    out0[o] = from_float<OutT>(n > 0 ? a0 / (float)n : (old != nullptr ? old[o] : 0.f));
    if (NSRC == 2) out1[o] = from_float<OutT>(n > 0 ? a1 / (float)n : 0.f);
  }
}

}  // namespace kmeans
}  // namespace kvplug
