// torch binding of kvplug_C::deviation_topk: fused deviation score kernel, then
// at::topk on the fp32 scores (radix select on device).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cusparse.h, absent from some toolkits.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/topk.h>

#include <optional>
#include <tuple>

#include "kvplug/deviation_topk.cuh"

namespace {

// Each token's [H, D] is one dense row (any token stride); strides of size-1 dims are free.
bool kvplug_rows_dense(const at::Tensor& t) {
  return t.dim() == 3 && (t.size(1) <= 1 || t.stride(1) == t.size(2)) && (t.size(2) <= 1 || t.stride(2) == 1);
}

using kvplug::deviation::Rows;

constexpr int kWarpsPerBlock = 8;

void check_rows(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 3, "deviation_topk: ", name, " must be [T, H, D], got ", t.sizes());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() &&
                        t.device() == like.device(),
                    "deviation_topk: ", name, " ", t.sizes(), " ", t.scalar_type(),
                    " does not match k_fresh ", like.sizes(), " ", like.scalar_type());
  TORCH_CHECK_VALUE(t.is_cuda(), "deviation_topk: ", name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(kvplug_rows_dense(t), "deviation_topk: ", name,
                    " shape ", t.sizes(), " strides ", t.strides(), ": each token's [H, D] must be dense");
}

bool aligned16(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * es) % 16 == 0;
}

template <typename T, bool HAS_V>
void launch(const at::Tensor& kf, const at::Tensor& kc, const at::Tensor& vf, const at::Tensor& vc,
            at::Tensor& out, bool vec) {
  const int64_t n = kf.size(0), F = kf.size(1) * kf.size(2);
  const Rows rkf{kf.data_ptr(), kf.stride(0)}, rkc{kc.data_ptr(), kc.stride(0)};
  const Rows rvf{vf.data_ptr(), vf.stride(0)}, rvc{vc.data_ptr(), vc.stride(0)};
  const dim3 grid((unsigned)((n + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(32 * kWarpsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  float* o = out.data_ptr<float>();
  if (vec) {
    kvplug::deviation::deviation_score_kernel<T, true, HAS_V><<<grid, block, 0, stream>>>(rkf, rkc, rvf, rvc, o, n, F);
  } else {
    kvplug::deviation::deviation_score_kernel<T, false, HAS_V><<<grid, block, 0, stream>>>(rkf, rkc, rvf, rvc, o, n, F);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const at::Tensor& kf, const at::Tensor& kc, const std::optional<at::Tensor>& vf,
                  const std::optional<at::Tensor>& vc, at::Tensor& out) {
  const int64_t F = kf.size(1) * kf.size(2);
  bool vec = (F * (int64_t)sizeof(T)) % 16 == 0 && aligned16(kf) && aligned16(kc);
  if (vf.has_value()) {
    vec = vec && aligned16(*vf) && aligned16(*vc);
    launch<T, true>(kf, kc, *vf, *vc, out, vec);
  } else {
    launch<T, false>(kf, kc, kf, kc, out, vec);
  }
}

std::tuple<at::Tensor, at::Tensor> deviation_topk_cuda(const at::Tensor& k_fresh, const at::Tensor& k_cached,
                                                       int64_t k, const std::optional<at::Tensor>& v_fresh,
                                                       const std::optional<at::Tensor>& v_cached) {
  TORCH_CHECK_VALUE(v_fresh.has_value() == v_cached.has_value(),
                    "deviation_topk: give both v_fresh and v_cached, or neither");
  check_rows("k_fresh", k_fresh, k_fresh);
  check_rows("k_cached", k_cached, k_fresh);
  if (v_fresh.has_value()) {
    check_rows("v_fresh", *v_fresh, k_fresh);
    check_rows("v_cached", *v_cached, k_fresh);
  }
  const c10::cuda::CUDAGuard guard(k_fresh.device());
  const int64_t n = k_fresh.size(0);
  at::Tensor scores = at::empty({n}, k_fresh.options().dtype(at::kFloat));
  if (n > 0 && k_fresh.numel() > 0) {
    switch (k_fresh.scalar_type()) {
      case at::kFloat: launch_typed<float>(k_fresh, k_cached, v_fresh, v_cached, scores); break;
      case at::kHalf: launch_typed<__half>(k_fresh, k_cached, v_fresh, v_cached, scores); break;
      case at::kBFloat16: launch_typed<__nv_bfloat16>(k_fresh, k_cached, v_fresh, v_cached, scores); break;
      default: TORCH_CHECK_VALUE(false, "deviation_topk: dtype ", k_fresh.scalar_type(), " is not fp16/bf16/fp32");
    }
  } else {
    scores.zero_();
  }
  const int64_t kk = std::max<int64_t>(0, std::min<int64_t>(k, n));
  return {scores, std::get<1>(at::topk(scores, kk))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvplug_C, m) {
  m.def("deviation_topk(Tensor k_fresh, Tensor k_cached, int k, Tensor? v_fresh, Tensor? v_cached)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvplug_C, CUDA, m) { m.impl("deviation_topk", &deviation_topk_cuda); }
