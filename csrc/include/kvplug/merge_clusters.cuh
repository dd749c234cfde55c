// Size-weighted cluster merge: K and V member means per (kv head, cluster) plus
// log(#members). Raw-pointer kernels, no torch headers. The means are
// kvplug::kmeans::segment_mean_kernel<T, T, 2> (one pass over the members reads K and V
// together, deterministic order); this header adds the log-size bias.
#pragma once
#include <cstdint>

#include "kvplug/kmeans.cuh"

namespace kvplug {
namespace merge {

// grid ceil(n / 256), block 256. log_size[i] = log(sizes[i]); an empty cluster gets -inf,
// so softmax gives it exactly zero weight.
__global__ void log_size_kernel(const int64_t* __restrict__ sizes, float* __restrict__ log_size, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) log_size[i] = sizes[i] > 0 ? logf((float)sizes[i]) : -INFINITY;
}

}  // namespace merge
}  // namespace kvplug
