// RoPE re-rotation of keys: moving a key from position p to q is one rotation by
// angle (q - p) * inv_freq[i] (fp32), since RoPE rotations compose. Raw pointers only.
//   pair_dims<NEOX>(j, half, a, b)     the two dims of rotation pair j (neox: j, j+half; gptj: 2j, 2j+1)
//   rotate_row_pairs<T, NEOX>(...)     rotate (or copy) the pairs of one token row, block-strided
//   rerotate_keys_kernel<T, NEOX>      keys/out [N, T, H, D] strided, D contiguous; grid (T, N)
//   pair_threads(H, D)                 host: block size of the pair-wise kernels
// Work item = one pair of dims of one head: j < half is a rotation pair, j >= half a
// pass-through pair (R + 2(j - half), +1) of a partial rotary head. Each pair is read and
// written by one thread, so in-place use (out == keys) is race-free.
#pragma once
#include "kvplug/common.cuh"

namespace kvplug {
namespace rope {

// Threads per block of the pair-wise RoPE kernels: one per pair of dims, at most 256.
inline int pair_threads(int heads, int head_dim) {
  const int pairs = heads * head_dim / 2;
  const int warps = (pairs + 31) / 32;
  return warps >= 8 ? 256 : (warps < 1 ? 32 : 32 * warps);
}

template <bool NEOX>
__device__ __forceinline__ void pair_dims(int j, int half, int* a, int* b) {
  if (j >= half) {  // pass-through pair after the rotary dims
    *a = 2 * half + 2 * (j - half);
    *b = *a + 1;
  } else if (NEOX) {
    *a = j;
    *b = j + half;
  } else {
    *a = 2 * j;
    *b = 2 * j + 1;
  }
}

// One token row of H heads: src/dst point at head 0, heads `src_h`/`dst_h` elements apart.
// ROTATE false copies every pair unchanged (V rows); COPY_REST false skips pass-through
// pairs (in place). head_dim is even (checked by the launcher).
template <typename T, bool NEOX>
__device__ __forceinline__ void rotate_row_pairs(const T* src, int64_t src_h, T* dst, int64_t dst_h, int H,
                                                 int head_dim, int half, int64_t delta, const float* inv_freq,
                                                 bool rotate, bool copy_rest) {
  const int pairs = head_dim / 2;
  for (int i = threadIdx.x; i < H * pairs; i += blockDim.x) {
    const int h = i / pairs, j = i % pairs;
    if (j >= half && !copy_rest) continue;
    int a, b;
    pair_dims<NEOX>(j, half, &a, &b);
    const T* s = src + h * src_h;
    T* d = dst + h * dst_h;
    const T xa = s[a], xb = s[b];
    if (rotate && j < half) {
      float sn, cs;
      sincos_reduced(static_cast<float>(delta) * inv_freq[j], &sn, &cs);
      const float fa = to_float(xa), fb = to_float(xb);
      d[a] = from_float<T>(fa * cs - fb * sn);
      d[b] = from_float<T>(fb * cs + fa * sn);
    } else {
      d[a] = xa;
      d[b] = xb;
    }
  }
}

struct Strided4 {  // [N, T, H, D] view, strides in elements, D contiguous
  int64_t n, t, h;
};

// grid (T, N): block (t, n) re-rotates token t of leading index n, all heads. keys and
// out may be the same memory (in place), so neither is __restrict__.
template <typename T, bool NEOX>
__global__ void rerotate_keys_kernel(const T* keys, Strided4 ks, T* out, Strided4 os,
                                     const int64_t* __restrict__ old_pos, const int64_t* __restrict__ new_pos,
                                     const float* __restrict__ inv_freq, int H, int head_dim, int half,
                                     bool copy_rest) {
  const int64_t t = blockIdx.x, n = blockIdx.y;
  const int64_t delta = new_pos[t] - old_pos[t];
  rotate_row_pairs<T, NEOX>(keys + n * ks.n + t * ks.t, ks.h, out + n * os.n + t * os.t, os.h, H, head_dim, half,
                            delta, inv_freq, true, copy_rest);
}

}  // namespace rope
}  // namespace kvplug
