// torch bindings of kvplug_C::quantize_kv / dequantize_kv: kv [L, 2, T, KV, D] (any strides,
// head_dim contiguous) <-> codes uint8 [L, 2, T, KV, C], k_meta fp16 [L, ngt, KV, D, 2],
// v_meta fp16 [L, T, KV, ngd, 2], all contiguous. The Python dispatcher (kvplug/ops/kv_quant.py)
// validates shapes; these launchers re-check what they index with.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cusparse.h, absent from some toolkits.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include "kvplug/kv_quant.cuh"

namespace {

using kvplug::kv_quant::QuantShape;

QuantShape check_args(const at::Tensor& kv, int64_t bits, int64_t group, const at::Tensor& codes,
                      const at::Tensor& k_meta, const at::Tensor& v_meta) {
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, "kv_quant: bits=", bits, " must be 4 or 8");
  TORCH_CHECK_VALUE(group >= 1, "kv_quant: group=", group, " must be >= 1");
  TORCH_CHECK_VALUE(kv.is_cuda() && kv.dim() == 5 && kv.size(1) == 2, "kv_quant: kv of shape ", kv.sizes(),
                    " must be a CUDA [L, 2, T, KV, D]");
  TORCH_CHECK_VALUE(kv.size(4) <= 1 || kv.stride(4) == 1, "kv_quant: kv strides ", kv.strides(),
                    " need a contiguous head_dim");
  const int64_t L = kv.size(0), T = kv.size(2), KV = kv.size(3), D = kv.size(4);
  const int64_t C = (D * bits + 7) / 8, ngt = (T + group - 1) / group, ngd = (D + group - 1) / group;
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.device() == kv.device() &&
                        codes.sizes() == at::IntArrayRef({L, 2, T, KV, C}),
                    "kv_quant: codes of shape ", codes.sizes(), " must be contiguous uint8 [", L, ", 2, ", T, ", ", KV,
                    ", ", C, "]");
  TORCH_CHECK_VALUE(k_meta.scalar_type() == at::kHalf && k_meta.is_contiguous() && k_meta.device() == kv.device() &&
                        k_meta.sizes() == at::IntArrayRef({L, ngt, KV, D, 2}),
                    "kv_quant: k_meta of shape ", k_meta.sizes(), " must be contiguous fp16 [", L, ", ", ngt, ", ", KV,
                    ", ", D, ", 2]");
  TORCH_CHECK_VALUE(v_meta.scalar_type() == at::kHalf && v_meta.is_contiguous() && v_meta.device() == kv.device() &&
                        v_meta.sizes() == at::IntArrayRef({L, T, KV, ngd, 2}),
                    "kv_quant: v_meta of shape ", v_meta.sizes(), " must be contiguous fp16 [", L, ", ", T, ", ", KV,
                    ", ", ngd, ", 2]");
  return QuantShape{L, T, KV, D, C, group, ngt, ngd, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)};
}

template <typename T>
void launch_quantize(const at::Tensor& kv, int64_t bits, const QuantShape& q, at::Tensor& codes, at::Tensor& k_meta,
                     at::Tensor& v_meta) {
  using kvplug::kv_quant::kThreads;
  using kvplug::kv_quant::launch_blocks;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* x = reinterpret_cast<const T*>(kv.data_ptr());
  auto* km = reinterpret_cast<__half*>(k_meta.data_ptr());
  auto* vm = reinterpret_cast<__half*>(v_meta.data_ptr());
  auto* c = codes.data_ptr<uint8_t>();
  const float qf = static_cast<float>((1 << bits) - 1);
  kvplug::kv_quant::key_meta_kernel<T><<<launch_blocks(q.L * q.ngt * q.KV * q.D), kThreads, 0, stream>>>(x, q, qf, km);
  kvplug::kv_quant::value_meta_kernel<T><<<launch_blocks(q.L * q.T * q.KV * q.ngd), kThreads, 0, stream>>>(x, q, qf,
                                                                                                          vm);
  const unsigned blocks = launch_blocks(q.L * 2 * q.T * q.KV * q.C);
  if (bits == 4) {
    kvplug::kv_quant::encode_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(x, q, km, vm, c);
  } else {
    kvplug::kv_quant::encode_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(x, q, km, vm, c);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void quantize_kv_cuda(const at::Tensor& kv, int64_t bits, int64_t group, at::Tensor& codes, at::Tensor& k_meta,
                      at::Tensor& v_meta) {
  const QuantShape q = check_args(kv, bits, group, codes, k_meta, v_meta);
  if (kv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(kv.device());
  switch (kv.scalar_type()) {
    case at::kFloat: launch_quantize<float>(kv, bits, q, codes, k_meta, v_meta); break;
    case at::kHalf: launch_quantize<__half>(kv, bits, q, codes, k_meta, v_meta); break;
    case at::kBFloat16: launch_quantize<__nv_bfloat16>(kv, bits, q, codes, k_meta, v_meta); break;
    default: TORCH_CHECK_VALUE(false, "quantize_kv: dtype ", kv.scalar_type(), " is not fp16/bf16/fp32");
  }
}

template <typename T>
void launch_dequantize(const at::Tensor& codes, const at::Tensor& k_meta, const at::Tensor& v_meta, int64_t bits,
                       const QuantShape& q, at::Tensor& out) {
  using kvplug::kv_quant::kThreads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = kvplug::kv_quant::launch_blocks(q.L * 2 * q.T * q.KV * q.C);
  const auto* c = codes.data_ptr<uint8_t>();
  const auto* km = reinterpret_cast<const __half*>(k_meta.data_ptr());
  const auto* vm = reinterpret_cast<const __half*>(v_meta.data_ptr());
  auto* o = reinterpret_cast<T*>(out.data_ptr());
  if (bits == 4) {
    kvplug::kv_quant::decode_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(c, km, vm, q, o);
  } else {
    kvplug::kv_quant::decode_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(c, km, vm, q, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize_kv_cuda(const at::Tensor& codes, const at::Tensor& k_meta, const at::Tensor& v_meta, int64_t bits,
                        int64_t group, at::Tensor& out) {
  const QuantShape q = check_args(out, bits, group, codes, k_meta, v_meta);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  switch (out.scalar_type()) {
    case at::kFloat: launch_dequantize<float>(codes, k_meta, v_meta, bits, q, out); break;
    case at::kHalf: launch_dequantize<__half>(codes, k_meta, v_meta, bits, q, out); break;
    case at::kBFloat16: launch_dequantize<__nv_bfloat16>(codes, k_meta, v_meta, bits, q, out); break;
    default: TORCH_CHECK_VALUE(false, "dequantize_kv: dtype ", out.scalar_type(), " is not fp16/bf16/fp32");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvplug_C, m) {
  m.def("quantize_kv(Tensor kv, int bits, int group, Tensor(a!) codes, Tensor(b!) k_meta, Tensor(c!) v_meta) -> ()");
  m.def("dequantize_kv(Tensor codes, Tensor k_meta, Tensor v_meta, int bits, int group, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(kvplug_C, CUDA, m) {
  m.impl("quantize_kv", &quantize_kv_cuda);
  m.impl("dequantize_kv", &dequantize_kv_cuda);
}
