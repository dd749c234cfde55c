// torch binding of kvplug_C::centroid_topk(queries [Q,Hq,D], centroids [Hkv,C,D], k)
//   -> (scores fp32 [Q,Hq,kk], indices int64 [Q,Hq,kk]): fused GQA score kernel, then
// at::topk along C. Only c10/cuda headers (ATen/cuda/CUDAContext.h pulls cusparse.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/topk.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "kvplug/centroid_topk.cuh"

namespace {

namespace ct = kvplug::centroid;

void check_inputs(const at::Tensor& q, const at::Tensor& c) {
  TORCH_CHECK_VALUE(q.is_cuda() && c.is_cuda() && q.device() == c.device(),
                    "centroid_topk: queries and centroids must be CUDA tensors on one device");
  TORCH_CHECK_VALUE(q.dim() == 3 && (q.size(2) <= 1 || q.stride(2) == 1), "centroid_topk: queries shape ", q.sizes(), " strides ",
                    q.strides(), ": must be [Q, Hq, D] with unit stride along D");
  TORCH_CHECK_VALUE(c.dim() == 3 && c.is_contiguous() && c.size(2) == q.size(2) && c.size(0) > 0 &&
                        q.size(1) % c.size(0) == 0,
                    "centroid_topk: centroids ", c.sizes(), " must be contiguous [Hkv, C, D] with Hq of queries ",
                    q.sizes(), " a multiple of Hkv");
  TORCH_CHECK_VALUE(q.size(2) <= 12 * 1024, "centroid_topk: head dim of ", q.sizes(), " exceeds 12288");
}

template <typename TQ, typename TC>
void launch(const at::Tensor& q, const at::Tensor& c, at::Tensor& out) {
  const int64_t Q = q.size(0), Hq = q.size(1), Hkv = c.size(0), C = c.size(1);
  const int D = (int)q.size(2);
  const dim3 grid((unsigned)(Q * Hq), (unsigned)((C + ct::kCentroidsPerBlock - 1) / ct::kCentroidsPerBlock));
  ct::centroid_scores_kernel<TQ, TC><<<grid, 32 * ct::kWarps, D * sizeof(float), c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const TQ*>(q.data_ptr()), static_cast<const TC*>(c.data_ptr()), out.data_ptr<float>(), Hq,
      Hq / Hkv, C, D, q.stride(0), q.stride(1), 1.0f / std::sqrt((float)D));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TQ>
void launch_q(const at::Tensor& q, const at::Tensor& c, at::Tensor& out) {
  switch (c.scalar_type()) {
    case at::kFloat: return launch<TQ, float>(q, c, out);
    case at::kHalf: return launch<TQ, __half>(q, c, out);
    case at::kBFloat16: return launch<TQ, __nv_bfloat16>(q, c, out);
    default: TORCH_CHECK_VALUE(false, "centroid_topk: centroids dtype ", c.scalar_type(), " is not fp16/bf16/fp32");
  }
}

std::tuple<at::Tensor, at::Tensor> centroid_topk_cuda(const at::Tensor& queries, const at::Tensor& centroids,
                                                      int64_t k) {
  check_inputs(queries, centroids);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t C = centroids.size(1);
  at::Tensor scores = at::empty({queries.size(0), queries.size(1), C}, queries.options().dtype(at::kFloat));
  if (scores.numel() > 0) {
    switch (queries.scalar_type()) {
      case at::kFloat: launch_q<float>(queries, centroids, scores); break;
      case at::kHalf: launch_q<__half>(queries, centroids, scores); break;
      case at::kBFloat16: launch_q<__nv_bfloat16>(queries, centroids, scores); break;
      default: TORCH_CHECK_VALUE(false, "centroid_topk: queries dtype ", queries.scalar_type(), " is not fp16/bf16/fp32");
    }
  }
  const int64_t kk = std::max<int64_t>(0, std::min<int64_t>(k, C));
  return at::topk(scores, kk, /*dim=*/-1);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvplug_C, m) {
  m.def("centroid_topk(Tensor queries, Tensor centroids, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvplug_C, CUDA, m) { m.impl("centroid_topk", &centroid_topk_cuda); }
