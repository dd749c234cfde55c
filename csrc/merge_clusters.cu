// torch binding of kvplug_C::merge_clusters(keys [T,H,D], values [T,H,D], assign int64 [H,T], n_clusters)
//   -> (merged_k [H,C,D], merged_v [H,C,D] in keys' dtype, log_size fp32 [H,C]).
// Stable sort of the assignment (at::argsort), then one fused K+V segmented-mean pass.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cusparse.h, absent from some toolkits.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "kvplug/merge_clusters.cuh"

namespace {

// Each token's [H, D] is one dense row (any token stride); strides of size-1 dims are free.
bool kvplug_rows_dense(const at::Tensor& t) {
  return t.dim() == 3 && (t.size(1) <= 1 || t.stride(1) == t.size(2)) && (t.size(2) <= 1 || t.stride(2) == 1);
}

void check_inputs(const at::Tensor& k, const at::Tensor& v, const at::Tensor& a, int64_t C) {
  TORCH_CHECK_VALUE(k.is_cuda() && v.device() == k.device() && a.device() == k.device(),
                    "merge_clusters: keys, values and assign must be CUDA tensors on one device");
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK_VALUE(t->dim() == 3 && t->sizes() == k.sizes() && t->scalar_type() == k.scalar_type() &&
                          kvplug_rows_dense(*t) && (k.size(0) <= 1 || t->stride(0) == k.stride(0)),
                      "merge_clusters: keys ", k.sizes(), " strides ", k.strides(), " and values ", v.sizes(),
                      " strides ", v.strides(), ": must be [T, H, D], one dtype, one token stride, dense [H, D] rows");
  }
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == k.size(1) && a.size(1) == k.size(0) &&
                        a.scalar_type() == at::kLong && a.is_contiguous(),
                    "merge_clusters: assign ", a.sizes(), " must be contiguous int64 [H, T] for keys ", k.sizes());
  TORCH_CHECK_VALUE(C >= 1, "merge_clusters: n_clusters=", C, " must be >= 1");
}

template <typename T>
void launch_means(const at::Tensor& k, const at::Tensor& v, const at::Tensor& order, const at::Tensor& offsets,
                  const at::Tensor& sizes, at::Tensor& mk, at::Tensor& mv, cudaStream_t stream) {
  const int64_t n = k.size(0), H = k.size(1), C = sizes.size(1);
  const int D = (int)k.size(2);
  const int threads = D >= 128 ? 128 : 32 * ((D + 31) / 32);
  kvplug::kmeans::segment_mean_kernel<T, T, 2><<<(unsigned)(H * C), threads, 0, stream>>>(
      static_cast<const T*>(k.data_ptr()), static_cast<const T*>(v.data_ptr()), static_cast<T*>(mk.data_ptr()),
      static_cast<T*>(mv.data_ptr()), nullptr, order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
      sizes.data_ptr<int64_t>(), n, C, D, k.stride(0), k.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_clusters_cuda(const at::Tensor& keys, const at::Tensor& values,
                                                                   const at::Tensor& assign, int64_t n_clusters) {
  check_inputs(keys, values, assign, n_clusters);
  const c10::cuda::CUDAGuard guard(keys.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t H = keys.size(1), C = n_clusters;
  at::Tensor sizes = at::zeros({H, C}, assign.options());
  sizes.scatter_add_(1, assign, at::ones_like(assign));
  const at::Tensor order = at::argsort(assign, /*stable=*/true, /*dim=*/1, /*descending=*/false).contiguous();
  const at::Tensor offsets = at::cumsum(sizes, 1).sub_(sizes).contiguous();
  at::Tensor mk = at::empty({H, C, keys.size(2)}, keys.options());
  at::Tensor mv = at::empty_like(mk);
  at::Tensor log_size = at::empty({H, C}, keys.options().dtype(at::kFloat));
  if (keys.size(2) > 0 && H > 0) {  // a zero-sized grid is a launch error
    switch (keys.scalar_type()) {
      case at::kFloat: launch_means<float>(keys, values, order, offsets, sizes, mk, mv, stream); break;
      case at::kHalf: launch_means<__half>(keys, values, order, offsets, sizes, mk, mv, stream); break;
      case at::kBFloat16: launch_means<__nv_bfloat16>(keys, values, order, offsets, sizes, mk, mv, stream); break;
      default: TORCH_CHECK_VALUE(false, "merge_clusters: dtype ", keys.scalar_type(), " is not fp16/bf16/fp32");
    }
  }
  const int64_t m = H * C;
  if (m > 0) {
    kvplug::merge::log_size_kernel<<<(unsigned)((m + 255) / 256), 256, 0, stream>>>(
        sizes.data_ptr<int64_t>(), log_size.data_ptr<float>(), m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {mk, mv, log_size};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvplug_C, m) {
  m.def("merge_clusters(Tensor keys, Tensor values, Tensor assign, int n_clusters) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvplug_C, CUDA, m) { m.impl("merge_clusters", &merge_clusters_cuda); }
