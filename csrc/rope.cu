// torch binding of kvplug_C::rerotate_keys: keys/out [N, T, H, D] (any strides, D
// contiguous; out may be keys itself). The Python dispatcher (kvplug/ops/rope.py) flattens
// leading dims and validates shapes; this launcher re-checks what it indexes with.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cusparse.h, absent from some toolkits.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "kvplug/rope.cuh"

namespace {

using kvplug::rope::Strided4;

void check_args(const at::Tensor& keys, const at::Tensor& old_pos, const at::Tensor& new_pos,
                const at::Tensor& inv_freq, const at::Tensor& out) {
  TORCH_CHECK_VALUE(keys.is_cuda() && keys.dim() == 4, "rerotate_keys: keys of shape ", keys.sizes(),
                    " must be a CUDA [N, T, H, D]");
  TORCH_CHECK_VALUE(out.sizes() == keys.sizes() && out.scalar_type() == keys.scalar_type() &&
                        out.device() == keys.device(),
                    "rerotate_keys: out ", out.sizes(), " ", out.scalar_type(), " must match keys ", keys.sizes());
  TORCH_CHECK_VALUE(keys.stride(3) == 1 && out.stride(3) == 1, "rerotate_keys: keys strides ", keys.strides(),
                    " and out strides ", out.strides(), " need a contiguous head_dim");
  const int64_t T_ = keys.size(1), D = keys.size(3);
  for (const at::Tensor* p : {&old_pos, &new_pos}) {
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == T_ && p->scalar_type() == at::kLong && p->is_contiguous() &&
                          p->device() == keys.device(),
                      "rerotate_keys: positions of shape ", p->sizes(), " must be contiguous int64 [", T_, "]");
  }
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() &&
                        inv_freq.device() == keys.device() && inv_freq.size(0) >= 1 && 2 * inv_freq.size(0) <= D,
                    "rerotate_keys: inv_freq of shape ", inv_freq.sizes(), " must be fp32 [rotary_dim / 2] with "
                    "rotary_dim <= head_dim ", D);
  TORCH_CHECK_VALUE(D % 2 == 0, "rerotate_keys: keys of shape ", keys.sizes(), " need an even head_dim");
  TORCH_CHECK_VALUE(keys.size(0) <= 65535, "rerotate_keys: keys of shape ", keys.sizes(),
                    " have more than 65535 leading rows");
}

template <typename T>
void launch(const at::Tensor& keys, const at::Tensor& old_pos, const at::Tensor& new_pos, const at::Tensor& inv_freq,
            bool neox, at::Tensor& out) {
  const int H = static_cast<int>(keys.size(2)), D = static_cast<int>(keys.size(3));
  const int half = static_cast<int>(inv_freq.size(0));
  const Strided4 ks{keys.stride(0), keys.stride(1), keys.stride(2)};
  const Strided4 os{out.stride(0), out.stride(1), out.stride(2)};
  // In place, the pass-through dims already hold their value: skip them.
  const bool copy_rest = keys.data_ptr() != out.data_ptr();
  const int threads = kvplug::rope::pair_threads(H, D);
  const dim3 grid(static_cast<unsigned>(keys.size(1)), static_cast<unsigned>(keys.size(0)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* k = reinterpret_cast<const T*>(keys.data_ptr());
  auto* o = reinterpret_cast<T*>(out.data_ptr());
  const auto* op = old_pos.data_ptr<int64_t>();
  const auto* np = new_pos.data_ptr<int64_t>();
  const float* f = inv_freq.data_ptr<float>();
  if (neox) {
    kvplug::rope::rerotate_keys_kernel<T, true><<<grid, threads, 0, stream>>>(k, ks, o, os, op, np, f, H, D, half,
                                                                              copy_rest);
  } else {
    kvplug::rope::rerotate_keys_kernel<T, false><<<grid, threads, 0, stream>>>(k, ks, o, os, op, np, f, H, D, half,
                                                                               copy_rest);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rerotate_keys_cuda(const at::Tensor& keys, const at::Tensor& old_pos, const at::Tensor& new_pos,
                        const at::Tensor& inv_freq, bool neox, at::Tensor& out) {
  check_args(keys, old_pos, new_pos, inv_freq, out);
  if (keys.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  switch (keys.scalar_type()) {
    case at::kFloat: launch<float>(keys, old_pos, new_pos, inv_freq, neox, out); break;
    case at::kHalf: launch<__half>(keys, old_pos, new_pos, inv_freq, neox, out); break;
    case at::kBFloat16: launch<__nv_bfloat16>(keys, old_pos, new_pos, inv_freq, neox, out); break;
    default: TORCH_CHECK_VALUE(false, "rerotate_keys: dtype ", keys.scalar_type(), " is not fp16/bf16/fp32");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvplug_C, m) {
  m.def("rerotate_keys(Tensor keys, Tensor old_pos, Tensor new_pos, Tensor inv_freq, bool neox,"
        " Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(kvplug_C, CUDA, m) { m.impl("rerotate_keys", &rerotate_keys_cuda); }
