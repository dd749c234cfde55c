// Chunk KV [L, 2, T, H, D] (contiguous) <-> paged K/V views of all layers in one launch.
// The paged side is reached through a device pointer table: table[2l + kv] is the base
// address of layer l's K (kv = 0) or V (kv = 1) view; all 2L views share one PagedView.
//   gather_kernel<V>      chunk <- caches; byte copy in units of V (uint4 ... uint8_t)
//   scatter_kernel<V>     caches <- chunk; slot < 0 (padding) is skipped
//   rerotate_scatter_kernel<T, NEOX>  caches <- chunk with K re-rotated by (new - old) * inv_freq
// Grid of the copies: (token tiles, 2L); blockIdx.y = 2l + kv. The launcher chooses V so
// that head_dim bytes, all strides and all base addresses are multiples of sizeof(V).
// Launch geometry (pick_vector_bytes, copy_tile_shape, ...) is host code here, shared by the
// torch launcher and the host emulation in tests/ops/test_cuda_compile.py.
#pragma once
#include "kvplug/common.cuh"
#include "kvplug/rope.cuh"

namespace kvplug {
namespace gather_scatter {

// A token tile: `tokens` tokens x H heads x `row` vectors per head, flattened so that
// consecutive threads touch consecutive vectors (coalesced on the chunk side and within
// each paged row).
struct Tile {
  int64_t num_tokens;  // T
  int heads;           // H
  int row;             // vectors per head (head_dim * elem_size / sizeof(V))
  int tokens;          // tokens per block
};

constexpr int kCopyThreads = 256;
constexpr int kVectorsPerBlock = 2048;  // a block moves up to 32 KiB with 16-byte vectors

// Largest power-of-two byte width (16 down to the element size) dividing the head row, every
// stride (elements) and every base address; strides are then exact in units of that vector.
inline int pick_vector_bytes(int64_t head_dim, int64_t elem_size, int64_t sb, int64_t st, int64_t sh,
                             int64_t ptr_align, int64_t chunk_addr) {
  const int64_t row = head_dim * elem_size;
  for (int w = 16; w > elem_size; w /= 2) {
    if (row % w == 0 && (sb * elem_size) % w == 0 && (st * elem_size) % w == 0 && (sh * elem_size) % w == 0 &&
        ptr_align % w == 0 && chunk_addr % w == 0)
      return w;
  }
  return static_cast<int>(elem_size);
}

// Element strides -> strides in vectors of vec_bytes (exact by pick_vector_bytes).
inline PagedView in_vectors(const PagedView& elems, int64_t elem_size, int vec_bytes) {
  const int64_t per = vec_bytes / elem_size;
  return PagedView{elems.block_size, elems.stride_block / per, elems.stride_token / per, elems.stride_head / per};
}

inline Tile copy_tile_shape(int64_t num_tokens, int heads, int64_t head_dim, int64_t elem_size, int vec_bytes) {
  Tile tile{num_tokens, heads, static_cast<int>(head_dim * elem_size / vec_bytes), 1};
  const int per_token = heads * tile.row > 0 ? heads * tile.row : 1;
  tile.tokens = per_token >= kVectorsPerBlock ? 1 : kVectorsPerBlock / per_token;
  return tile;
}

template <typename V, bool TO_CACHE>
__device__ __forceinline__ void copy_tile(const int64_t* __restrict__ table, const int64_t* __restrict__ slots,
                                          V* chunk, const PagedView& pv, const Tile& tile) {
  const int64_t lkv = blockIdx.y;
  V* base = reinterpret_cast<V*>(table[lkv]);
  const int per_token = tile.heads * tile.row;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tile.tokens;
  for (int i = threadIdx.x; i < tile.tokens * per_token; i += blockDim.x) {
    const int64_t t = t0 + i / per_token;
    if (t >= tile.num_tokens) break;  // i only grows, so every later i is past T as well
    const int rem = i % per_token, h = rem / tile.row, v = rem % tile.row;
    const int64_t slot = slots[t];
    V* chunk_el = chunk + ((lkv * tile.num_tokens + t) * tile.heads + h) * tile.row + v;
    if (slot < 0) {  // padding on scatter; rejected before launch on gather
      if (!TO_CACHE) *chunk_el = V{};
      continue;
    }
    V* cache_el = base + paged_row(pv, slot) + h * pv.stride_head + v;
    if (TO_CACHE) {
      *cache_el = *chunk_el;
    } else {
      *chunk_el = *cache_el;
    }
  }
}

template <typename V>
__global__ void gather_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ slots, V* out,
                              PagedView pv, Tile tile) {
  copy_tile<V, false>(table, slots, out, pv, tile);
}

template <typename V>
__global__ void scatter_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ slots,
                               const V* chunk, PagedView pv, Tile tile) {
  copy_tile<V, true>(table, slots, const_cast<V*>(chunk), pv, tile);
}

// grid (T, 2L): block (t, 2l + kv) writes token t of layer l's K or V; strides of pv in
// elements of T. K rows are re-rotated, V rows copied (the branch is uniform per block).
template <typename T, bool NEOX>
__global__ void rerotate_scatter_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ slots,
                                        const T* __restrict__ chunk, const int64_t* __restrict__ old_pos,
                                        const int64_t* __restrict__ new_pos, const float* __restrict__ inv_freq,
                                        PagedView pv, int64_t num_tokens, int H, int head_dim, int half) {
  const int64_t t = blockIdx.x, lkv = blockIdx.y;
  const int64_t slot = slots[t];
  if (slot < 0) return;  // padding
  T* dst = reinterpret_cast<T*>(table[lkv]) + paged_row(pv, slot);
  const T* src = chunk + (lkv * num_tokens + t) * H * head_dim;
  const bool is_k = (lkv % 2) == 0;
  rope::rotate_row_pairs<T, NEOX>(src, head_dim, dst, pv.stride_head, H, head_dim, half,
                                  new_pos[t] - old_pos[t], inv_freq, is_k, true);
}

}  // namespace gather_scatter
}  // namespace kvplug
