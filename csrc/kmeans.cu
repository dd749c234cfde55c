// torch binding of kvplug_C::kmeans_step(keys [T,H,D], centroids fp32 [H,C,D])
//   -> (new_centroids fp32 [H,C,D], assign int64 [H,T], sizes int64 [H,C]).
// assign_kernel, then a stable sort of the assignment (at::argsort) so that
// segment_mean_kernel sums every cluster in a fixed order: bit-deterministic.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cusparse.h, absent from some toolkits.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "kvplug/kmeans.cuh"

namespace {

// Each token's [H, D] is one dense row (any token stride); strides of size-1 dims are free.
bool kvplug_rows_dense(const at::Tensor& t) {
  return t.dim() == 3 && (t.size(1) <= 1 || t.stride(1) == t.size(2)) && (t.size(2) <= 1 || t.stride(2) == 1);
}

namespace km = kvplug::kmeans;

constexpr int kMaxD = 256;  // assign_kernel stages D * 65 floats of keys in shared memory

void check_inputs(const at::Tensor& keys, const at::Tensor& cen) {
  TORCH_CHECK_VALUE(keys.is_cuda() && cen.is_cuda() && keys.device() == cen.device(),
                    "kmeans_step: keys and centroids must be CUDA tensors on one device");
  TORCH_CHECK_VALUE(keys.dim() == 3 && kvplug_rows_dense(keys),
                    "kmeans_step: keys shape ", keys.sizes(), " strides ", keys.strides(),
                    ": must be [T, H, D] with dense [H, D] rows");
  TORCH_CHECK_VALUE(keys.size(2) >= 1 && keys.size(2) <= kMaxD, "kmeans_step: keys shape ", keys.sizes(),
                    ": head dim must be in [1, ", kMaxD, "]");
  TORCH_CHECK_VALUE(cen.dim() == 3 && cen.size(0) == keys.size(1) && cen.size(2) == keys.size(2) &&
                        cen.size(1) >= 1 && cen.scalar_type() == at::kFloat && cen.is_contiguous(),
                    "kmeans_step: centroids ", cen.sizes(), " ", cen.scalar_type(),
                    " must be contiguous fp32 [H, C>=1, D] for keys ", keys.sizes());
}

template <typename T>
void launch_assign(const at::Tensor& keys, const at::Tensor& cen, at::Tensor& assign, cudaStream_t stream) {
  const int64_t n = keys.size(0), H = keys.size(1), C = cen.size(1);
  const int D = (int)keys.size(2);
  const int64_t smem = km::assign_smem_bytes(D);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(km::assign_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  const dim3 grid((unsigned)((n + km::kTokens - 1) / km::kTokens), (unsigned)H);
  km::assign_kernel<T><<<grid, km::kAssignThreads, smem, stream>>>(
      static_cast<const T*>(keys.data_ptr()), cen.data_ptr<float>(), assign.data_ptr<int64_t>(), n, C, D,
      keys.stride(0), keys.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_update(const at::Tensor& keys, const at::Tensor& cen, const at::Tensor& order, const at::Tensor& offsets,
                   const at::Tensor& sizes, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = keys.size(0), H = keys.size(1), C = cen.size(1);
  const int D = (int)keys.size(2);
  const int threads = D >= 128 ? 128 : 32 * ((D + 31) / 32);
  const T* src = static_cast<const T*>(keys.data_ptr());
  km::segment_mean_kernel<T, float, 1><<<(unsigned)(H * C), threads, 0, stream>>>(
      src, src, out.data_ptr<float>(), out.data_ptr<float>(), cen.data_ptr<float>(), order.data_ptr<int64_t>(),
      offsets.data_ptr<int64_t>(), sizes.data_ptr<int64_t>(), n, C, D, keys.stride(0), keys.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_typed(const at::Tensor& keys, const at::Tensor& cen) {
  const int64_t n = keys.size(0), H = keys.size(1), C = cen.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor assign = at::empty({H, n}, keys.options().dtype(at::kLong));
  at::Tensor sizes = at::zeros({H, C}, keys.options().dtype(at::kLong));
  if (n == 0 || H == 0) return {cen.clone(), assign, sizes};  // a zero-sized grid is a launch error
  launch_assign<T>(keys, cen, assign, stream);
  sizes.scatter_add_(1, assign, at::ones_like(assign));
  const at::Tensor order = at::argsort(assign, /*stable=*/true, /*dim=*/1, /*descending=*/false).contiguous();
  const at::Tensor offsets = at::cumsum(sizes, 1).sub_(sizes).contiguous();
  at::Tensor out = at::empty({H, C, keys.size(2)}, cen.options());
  launch_update<T>(keys, cen, order, offsets, sizes, out, stream);
  return {out, assign, sizes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_step_cuda(const at::Tensor& keys, const at::Tensor& centroids) {
  check_inputs(keys, centroids);
  const c10::cuda::CUDAGuard guard(keys.device());
  switch (keys.scalar_type()) {
    case at::kFloat: return step_typed<float>(keys, centroids);
    case at::kHalf: return step_typed<__half>(keys, centroids);
    case at::kBFloat16: return step_typed<__nv_bfloat16>(keys, centroids);
    default: TORCH_CHECK_VALUE(false, "kmeans_step: keys dtype ", keys.scalar_type(), " is not fp16/bf16/fp32");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvplug_C, m) {
  m.def("kmeans_step(Tensor keys, Tensor centroids) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvplug_C, CUDA, m) { m.impl("kmeans_step", &kmeans_step_cuda); }
