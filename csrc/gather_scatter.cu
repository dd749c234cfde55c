// torch bindings of kvplug_C::gather_chunks / scatter_chunks / rerotate_and_scatter.
// The Python dispatcher (kvplug/ops/gather_scatter.py) validates the caches, builds the
// device pointer table and checks slots; these launchers re-check what they index with.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cusparse.h, absent from some toolkits.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "kvplug/gather_scatter.cuh"

namespace {

using kvplug::PagedView;
using kvplug::gather_scatter::Tile;
using kvplug::gather_scatter::kCopyThreads;

void check_common(const at::Tensor& chunk, const at::Tensor& table, const at::Tensor& slots) {
  TORCH_CHECK_VALUE(chunk.is_cuda() && table.device() == chunk.device() && slots.device() == chunk.device(),
                    "kvplug: chunk, pointer table and slots must be on one CUDA device");
  TORCH_CHECK_VALUE(chunk.dim() == 5 && chunk.size(1) == 2 && chunk.is_contiguous(), "kvplug: chunk of shape ",
                    chunk.sizes(), " must be a contiguous [L, 2, T, H, D]");
  TORCH_CHECK_VALUE(table.dim() == 1 && table.scalar_type() == at::kLong && table.size(0) == 2 * chunk.size(0),
                    "kvplug: pointer table of shape ", table.sizes(), " must be int64 [2L] for chunk ", chunk.sizes());
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.size(0) == chunk.size(2),
                    "kvplug: slots of shape ", slots.sizes(), " must be int64 [T] for chunk ", chunk.sizes());
  TORCH_CHECK_VALUE(chunk.size(0) <= 32767, "kvplug: chunk of shape ", chunk.sizes(), " has too many layers");
}

template <typename V>
void launch_copy(bool to_cache, const at::Tensor& chunk, const at::Tensor& table, const at::Tensor& slots,
                 int64_t block_size, int64_t sb, int64_t st, int64_t sh) {
  const int64_t es = chunk.element_size();
  const PagedView pv = kvplug::gather_scatter::in_vectors(PagedView{block_size, sb, st, sh}, es, sizeof(V));
  const Tile tile = kvplug::gather_scatter::copy_tile_shape(chunk.size(2), static_cast<int>(chunk.size(3)),
                                                            chunk.size(4), es, sizeof(V));
  const dim3 grid(static_cast<unsigned>(kvplug::ceil_div(tile.num_tokens, tile.tokens)),
                  static_cast<unsigned>(2 * chunk.size(0)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* tab = table.data_ptr<int64_t>();
  const auto* sl = slots.data_ptr<int64_t>();
  V* ch = reinterpret_cast<V*>(chunk.data_ptr());
  if (to_cache) {
    kvplug::gather_scatter::scatter_kernel<V><<<grid, kCopyThreads, 0, stream>>>(tab, sl, ch, pv, tile);
  } else {
    kvplug::gather_scatter::gather_kernel<V><<<grid, kCopyThreads, 0, stream>>>(tab, sl, ch, pv, tile);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_chunks(bool to_cache, const at::Tensor& chunk, const at::Tensor& table, const at::Tensor& slots,
                 int64_t block_size, int64_t sb, int64_t st, int64_t sh, int64_t ptr_align) {
  check_common(chunk, table, slots);
  TORCH_CHECK_VALUE(block_size > 0, "kvplug: block_size ", block_size, " must be positive");
  const auto dtype = chunk.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "kvplug: chunk dtype ",
                    dtype, " is not fp16/bf16/fp32");
  if (chunk.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(chunk.device());
  const auto addr = static_cast<int64_t>(reinterpret_cast<uintptr_t>(chunk.data_ptr()));
  switch (kvplug::gather_scatter::pick_vector_bytes(chunk.size(4), chunk.element_size(), sb, st, sh, ptr_align,
                                                    addr)) {
    case 16: launch_copy<uint4>(to_cache, chunk, table, slots, block_size, sb, st, sh); break;
    case 8: launch_copy<uint2>(to_cache, chunk, table, slots, block_size, sb, st, sh); break;
    case 4: launch_copy<uint32_t>(to_cache, chunk, table, slots, block_size, sb, st, sh); break;
    default: launch_copy<uint16_t>(to_cache, chunk, table, slots, block_size, sb, st, sh); break;
  }
}

void gather_chunks_cuda(const at::Tensor& table, const at::Tensor& slots, at::Tensor& out, int64_t block_size,
                        int64_t sb, int64_t st, int64_t sh, int64_t ptr_align) {
  copy_chunks(false, out, table, slots, block_size, sb, st, sh, ptr_align);
}

void scatter_chunks_cuda(const at::Tensor& chunk, const at::Tensor& table, const at::Tensor& slots,
                         int64_t block_size, int64_t sb, int64_t st, int64_t sh, int64_t ptr_align) {
  copy_chunks(true, chunk, table, slots, block_size, sb, st, sh, ptr_align);
}

template <typename T>
void launch_rerotate_scatter(const at::Tensor& chunk, const at::Tensor& old_pos, const at::Tensor& new_pos,
                             const at::Tensor& inv_freq, bool neox, const at::Tensor& table,
                             const at::Tensor& slots, const PagedView& pv) {
  const int64_t T_ = chunk.size(2);
  const int H = static_cast<int>(chunk.size(3)), D = static_cast<int>(chunk.size(4));
  const int half = static_cast<int>(inv_freq.size(0));
  const int threads = kvplug::rope::pair_threads(H, D);
  const dim3 grid(static_cast<unsigned>(T_), static_cast<unsigned>(2 * chunk.size(0)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* tab = table.data_ptr<int64_t>();
  const auto* sl = slots.data_ptr<int64_t>();
  const auto* src = reinterpret_cast<const T*>(chunk.data_ptr());
  const auto* op = old_pos.data_ptr<int64_t>();
  const auto* np = new_pos.data_ptr<int64_t>();
  const float* f = inv_freq.data_ptr<float>();
  if (neox) {
    kvplug::gather_scatter::rerotate_scatter_kernel<T, true>
        <<<grid, threads, 0, stream>>>(tab, sl, src, op, np, f, pv, T_, H, D, half);
  } else {
    kvplug::gather_scatter::rerotate_scatter_kernel<T, false>
        <<<grid, threads, 0, stream>>>(tab, sl, src, op, np, f, pv, T_, H, D, half);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_rope(const at::Tensor& chunk, const at::Tensor& old_pos, const at::Tensor& new_pos,
                const at::Tensor& inv_freq) {
  const int64_t T_ = chunk.size(2), D = chunk.size(4);
  for (const at::Tensor* p : {&old_pos, &new_pos}) {
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == T_ && p->scalar_type() == at::kLong && p->is_contiguous() &&
                          p->device() == chunk.device(),
                      "kvplug: positions of shape ", p->sizes(), " must be contiguous int64 [", T_, "]");
  }
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() &&
                        inv_freq.device() == chunk.device() && inv_freq.size(0) >= 1 && 2 * inv_freq.size(0) <= D,
                    "kvplug: inv_freq of shape ", inv_freq.sizes(), " must be fp32 [rotary_dim / 2], rotary_dim <= ", D);
  TORCH_CHECK_VALUE(D % 2 == 0, "kvplug: head_dim of chunk ", chunk.sizes(), " must be even for RoPE");
}

void rerotate_and_scatter_cuda(const at::Tensor& chunk, const at::Tensor& old_pos, const at::Tensor& new_pos,
                               const at::Tensor& inv_freq, bool neox, const at::Tensor& table,
                               const at::Tensor& slots, int64_t block_size, int64_t sb, int64_t st, int64_t sh) {
  check_common(chunk, table, slots);
  check_rope(chunk, old_pos, new_pos, inv_freq);
  TORCH_CHECK_VALUE(block_size > 0, "kvplug: block_size ", block_size, " must be positive");
  if (chunk.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(chunk.device());
  const PagedView pv{block_size, sb, st, sh};
  switch (chunk.scalar_type()) {
    case at::kFloat: launch_rerotate_scatter<float>(chunk, old_pos, new_pos, inv_freq, neox, table, slots, pv); break;
    case at::kHalf: launch_rerotate_scatter<__half>(chunk, old_pos, new_pos, inv_freq, neox, table, slots, pv); break;
    case at::kBFloat16:
      launch_rerotate_scatter<__nv_bfloat16>(chunk, old_pos, new_pos, inv_freq, neox, table, slots, pv);
      break;
    default: TORCH_CHECK_VALUE(false, "kvplug: chunk dtype ", chunk.scalar_type(), " is not fp16/bf16/fp32");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvplug_C, m) {
  m.def("gather_chunks(Tensor table, Tensor slots, Tensor(a!) out, int block_size, int stride_block,"
        " int stride_token, int stride_head, int ptr_align) -> ()");
  m.def("scatter_chunks(Tensor chunk, Tensor table, Tensor slots, int block_size, int stride_block,"
        " int stride_token, int stride_head, int ptr_align) -> ()");
  m.def("rerotate_and_scatter(Tensor chunk, Tensor old_pos, Tensor new_pos, Tensor inv_freq, bool neox,"
        " Tensor table, Tensor slots, int block_size, int stride_block, int stride_token, int stride_head) -> ()");
}

TORCH_LIBRARY_IMPL(kvplug_C, CUDA, m) {
  m.impl("gather_chunks", &gather_chunks_cuda);
  m.impl("scatter_chunks", &scatter_chunks_cuda);
  m.impl("rerotate_and_scatter", &rerotate_and_scatter_cuda);
}
