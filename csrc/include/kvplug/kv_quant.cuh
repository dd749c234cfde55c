// Group-wise int8/int4 quantization of canonical KV [L, 2, T, KV, D]; the spec is
// kvplug/ops/kv_quant.py (keys: one (scale, zero) per layer, group of G tokens, head, channel;
// values: per layer, token, head, group of G channels). Raw pointers only.
//   QuantShape                      sizes of one call and the element strides of the KV side
//   round_fp16(x, up)               fp32 value of x rounded to fp16 toward +inf (up) or -inf
//   scale_zero(mn, mx, qf, &s, &z)  a group's fp16 (scale, zero) as fp32
//   key_meta_kernel<T>              item (layer, token group, head, channel): k_meta
//   value_meta_kernel<T>            item (layer, token, head, channel group): v_meta
//   encode_kernel<T, BITS>          item (layer, K/V, token, head, code byte): its code(s), after both meta kernels
//   decode_kernel<T, BITS>          item (layer, K/V, token, head, code byte): code * scale + zero -> out
//   launch_blocks(items)            host: blocks of kThreads for a 1-D grid-stride launch
// Every kernel is a 1-D grid-stride loop over independent items: each output element is written
// by one thread, no shared memory, no barriers. Divisions and the decode's product and sum use the
// _rn intrinsics, so --use_fast_math gives the spec's IEEE results.
#pragma once
#include "kvplug/common.cuh"

namespace kvplug {
namespace kv_quant {

constexpr int kThreads = 256;

struct QuantShape {
  int64_t L, T, KV, D, C;  // C = code bytes per (token, head) row
  int64_t G, ngt, ngd;     // group size, key groups (over T), value groups (over D)
  int64_t sl, sw, st, sh;  // element strides of the KV tensor's L, K/V, T, KV dims; D is contiguous
};

inline unsigned launch_blocks(int64_t items) {
  const int64_t blocks = ceil_div(items, kThreads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

__device__ __forceinline__ float round_fp16(float x, bool up) {
  return __half2float(up ? __float2half_ru(x) : __float2half_rd(x));
}

__device__ __forceinline__ void scale_zero(float mn, float mx, float qf, float* s, float* z) {
  *z = round_fp16(mn, false);
  *s = round_fp16(__fdiv_rn(mx - *z, qf), true);
}

__device__ __forceinline__ int encode(float x, float s, float z, float qf) {
  if (!(s > 0.f)) return 0;
  const float y = floorf(__fdiv_rn(x - z, s) + 0.5f);
  return static_cast<int>(fminf(fmaxf(y, 0.f), qf));
}

__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_step() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Offset (in halves) of the scale of element (l, w, t, h, d); the zero follows it.
__device__ __forceinline__ int64_t meta_at(const QuantShape& q, int w, int64_t l, int64_t t, int64_t h, int64_t d) {
  if (w == 0) return (((l * q.ngt + t / q.G) * q.KV + h) * q.D + d) * 2;
  return (((l * q.T + t) * q.KV + h) * q.ngd + d / q.G) * 2;
}

template <typename T>
__global__ void key_meta_kernel(const T* __restrict__ kv, QuantShape q, float qf, __half* __restrict__ k_meta) {
  const int64_t n = q.L * q.ngt * q.KV * q.D;
  for (int64_t i = grid_start(); i < n; i += grid_step()) {
    const int64_t d = i % q.D, h = (i / q.D) % q.KV, g = (i / (q.D * q.KV)) % q.ngt, l = i / (q.D * q.KV * q.ngt);
    const int64_t t_end = (g + 1) * q.G < q.T ? (g + 1) * q.G : q.T;
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t t = g * q.G; t < t_end; ++t) {
      const float x = to_float(kv[l * q.sl + t * q.st + h * q.sh + d]);
      mn = fminf(mn, x);
      mx = fmaxf(mx, x);
    }
    float s, z;
    scale_zero(mn, mx, qf, &s, &z);
    k_meta[2 * i] = __float2half_rn(s);  // exact: s and z are fp16 values
    k_meta[2 * i + 1] = __float2half_rn(z);
  }
}

template <typename T>
__global__ void value_meta_kernel(const T* __restrict__ kv, QuantShape q, float qf, __half* __restrict__ v_meta) {
  const int64_t n = q.L * q.T * q.KV * q.ngd;
  for (int64_t i = grid_start(); i < n; i += grid_step()) {
    const int64_t g = i % q.ngd, h = (i / q.ngd) % q.KV, t = (i / (q.ngd * q.KV)) % q.T, l = i / (q.ngd * q.KV * q.T);
    const T* row = kv + l * q.sl + q.sw + t * q.st + h * q.sh;
    const int64_t d_end = (g + 1) * q.G < q.D ? (g + 1) * q.G : q.D;
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t d = g * q.G; d < d_end; ++d) {
      const float x = to_float(row[d]);
      mn = fminf(mn, x);
      mx = fmaxf(mx, x);
    }
    float s, z;
    scale_zero(mn, mx, qf, &s, &z);
    v_meta[2 * i] = __float2half_rn(s);
    v_meta[2 * i + 1] = __float2half_rn(z);
  }
}

// Item i = (((l * 2 + w) * T + t) * KV + h) * C + j, the byte codes[i] itself (codes are contiguous).
template <typename T, int BITS>
__global__ void encode_kernel(const T* __restrict__ kv, QuantShape q, const __half* __restrict__ k_meta,
                              const __half* __restrict__ v_meta, uint8_t* __restrict__ codes) {
  constexpr int kPer = BITS == 4 ? 2 : 1;
  const float qf = static_cast<float>((1 << BITS) - 1);
  const int64_t n = q.L * 2 * q.T * q.KV * q.C;
  for (int64_t i = grid_start(); i < n; i += grid_step()) {
    const int64_t j = i % q.C, h = (i / q.C) % q.KV, t = (i / (q.C * q.KV)) % q.T;
    const int64_t lw = i / (q.C * q.KV * q.T);
    const int64_t l = lw / 2;
    const int w = static_cast<int>(lw % 2);
    const __half* meta = w == 0 ? k_meta : v_meta;
    const T* row = kv + l * q.sl + w * q.sw + t * q.st + h * q.sh;
    int byte = 0;
    for (int k = 0; k < kPer; ++k) {
      const int64_t d = j * kPer + k;
      if (d >= q.D) break;
      const int64_t at = meta_at(q, w, l, t, h, d);
      byte |= encode(to_float(row[d]), __half2float(meta[at]), __half2float(meta[at + 1]), qf) << (4 * k);
    }
    codes[i] = static_cast<uint8_t>(byte);
  }
}

// q.sl .. q.sh are the output's strides here.
template <typename T, int BITS>
__global__ void decode_kernel(const uint8_t* __restrict__ codes, const __half* __restrict__ k_meta,
                              const __half* __restrict__ v_meta, QuantShape q, T* __restrict__ out) {
  constexpr int kPer = BITS == 4 ? 2 : 1;
  const int64_t n = q.L * 2 * q.T * q.KV * q.C;
  for (int64_t i = grid_start(); i < n; i += grid_step()) {
    const int64_t j = i % q.C, h = (i / q.C) % q.KV, t = (i / (q.C * q.KV)) % q.T;
    const int64_t lw = i / (q.C * q.KV * q.T);
    const int64_t l = lw / 2;
    const int w = static_cast<int>(lw % 2);
    const __half* meta = w == 0 ? k_meta : v_meta;
    T* row = out + l * q.sl + w * q.sw + t * q.st + h * q.sh;
    const int byte = codes[i];
    for (int k = 0; k < kPer; ++k) {
      const int64_t d = j * kPer + k;
      if (d >= q.D) break;
      const int code = BITS == 4 ? (byte >> (4 * k)) & 15 : byte;
      const int64_t at = meta_at(q, w, l, t, h, d);
      const float x = __fadd_rn(__fmul_rn(static_cast<float>(code), __half2float(meta[at])), __half2float(meta[at + 1]));
      row[d] = from_float<T>(x);
    }
  }
}

}  // namespace kv_quant
}  // namespace kvplug
