"""The kv_quant CUDA kernels (csrc/include/kvplug/kv_quant.cuh) run on the host against the torch spec.

csrc/kv_quant.cu is compiled for sm_90 by tests/ops/test_cuda_compile.py (it globs csrc/*.cu). Here the
header is compiled by g++ with the CUDA qualifiers defined away, and every (block, thread) of each
launch is called in turn, with the launch geometry the binding uses. Sound for these kernels: 1-D
grid-stride loops over independent items, no shared memory, no barriers, each output element written
by one thread. The _rn intrinsics become the plain IEEE operations they stand for; the fp16 directed
roundings (__float2half_rd / _ru) are CUDA's own host implementations. This checks index math, packing
and rounding; it cannot check races or nvcc's code generation.
"""
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_compile import _cuda_include  # noqa: E402
from test_kv_quant import SHAPES, assert_same_quant, make_kv  # noqa: E402

from kvplug.ops.kv_quant import QuantKV, dequantize_kv_ref, empty_quant, quantize_kv_ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

HARNESS = r"""
#define __global__
#define __device__
#define __host__
#include <cmath>
#include <cstdint>
#include <vector_types.h>

uint3 blockIdx, threadIdx;
dim3 blockDim, gridDim;
namespace kvplug {
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
}  // namespace kvplug

#include "kvplug/kv_quant.cuh"

namespace {
using namespace kvplug;
using namespace kvplug::kv_quant;

template <typename F>
void launch(int64_t items, F kernel) {
  const unsigned blocks = launch_blocks(items);
  gridDim = dim3(blocks, 1, 1);
  blockDim = dim3(kThreads, 1, 1);
  for (unsigned b = 0; b < blocks; ++b)
    for (int t = 0; t < kThreads; ++t) {
      blockIdx = uint3{b, 0, 0};
      threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
      kernel();
    }
}

template <typename F>
void by_dtype(int dtype, F fn) {
  if (dtype == 0) fn(float{});
  else if (dtype == 1) fn(__half{});
  else fn(__nv_bfloat16{});
}
}  // namespace

extern "C" void emu_quantize(int dtype, int bits, const void* kv, const int64_t* shape, void* codes, void* k_meta,
                             void* v_meta) {
  const QuantShape q{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7],
                     shape[8], shape[9], shape[10], shape[11]};
  const float qf = static_cast<float>((1 << bits) - 1);
  auto* km = static_cast<__half*>(k_meta);
  auto* vm = static_cast<__half*>(v_meta);
  auto* c = static_cast<uint8_t*>(codes);
  by_dtype(dtype, [&](auto zero) {
    using E = decltype(zero);
    const E* x = static_cast<const E*>(kv);
    launch(q.L * q.ngt * q.KV * q.D, [&] { key_meta_kernel<E>(x, q, qf, km); });
    launch(q.L * q.T * q.KV * q.ngd, [&] { value_meta_kernel<E>(x, q, qf, vm); });
    launch(q.L * 2 * q.T * q.KV * q.C, [&] {
      if (bits == 4) encode_kernel<E, 4>(x, q, km, vm, c);
      else encode_kernel<E, 8>(x, q, km, vm, c);
    });
  });
}

extern "C" void emu_dequantize(int dtype, int bits, const void* codes, const void* k_meta, const void* v_meta,
                               const int64_t* shape, void* out) {
  const QuantShape q{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7],
                     shape[8], shape[9], shape[10], shape[11]};
  by_dtype(dtype, [&](auto zero) {
    using E = decltype(zero);
    launch(q.L * 2 * q.T * q.KV * q.C, [&] {
      const auto* c = static_cast<const uint8_t*>(codes);
      const auto* km = static_cast<const __half*>(k_meta);
      const auto* vm = static_cast<const __half*>(v_meta);
      if (bits == 4) decode_kernel<E, 4>(c, km, vm, q, static_cast<E*>(out));
      else decode_kernel<E, 8>(c, km, vm, q, static_cast<E*>(out));
    });
  });
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PTR, INT = ctypes.c_void_p, ctypes.c_int


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    include, cxx = _cuda_include(), shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h)")
    tmp = tmp_path_factory.mktemp("emu_kv_quant")
    (tmp / "harness.cpp").write_text(HARNESS)
    lib = tmp / "libemu.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{ROOT / 'csrc' / 'include'}", f"-I{include}",
                    str(tmp / "harness.cpp"), "-o", str(lib)], check=True, capture_output=True, text=True)
    dll = ctypes.CDLL(str(lib))
    dll.emu_quantize.argtypes = [INT, INT, PTR, PTR, PTR, PTR, PTR]
    dll.emu_dequantize.argtypes = [INT, INT, PTR, PTR, PTR, PTR, PTR]
    return dll


def shape_args(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """QuantShape of a kv-shaped tensor x (its strides: the input of quantize, the output of dequantize)."""
    L, _, T, KV, D = x.shape
    return torch.tensor([L, T, KV, D, -(-D * bits // 8), group, -(-T // group), -(-D // group),
                         *x.stride()[:4]], dtype=torch.int64)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", list(DTYPE_CODE))
@pytest.mark.parametrize("L,T,KV,D,group", [s for s in SHAPES if s[1] > 0])
def test_emulated_quantize_and_dequantize_match_the_spec(emu, bits, dtype, L, T, KV, D, group):
    wide = make_kv(L, T, KV, D + 2, dtype, seed=T + bits)
    kv = wide[..., 1:D + 1]  # strided, head_dim contiguous
    got = empty_quant(L, T, KV, D, bits, group)
    shape = shape_args(kv, bits, group)
    emu.emu_quantize(DTYPE_CODE[dtype], bits, kv.data_ptr(), shape.data_ptr(), *(p.data_ptr() for p in got))
    want = quantize_kv_ref(kv, bits, group)
    assert_same_quant(got, want, bits, D)

    out = torch.zeros(L, 2, T, KV, D + 3, dtype=dtype)[..., 2:D + 2]
    out_shape = shape_args(out, bits, group)  # held: the call reads it through a raw pointer
    emu.emu_dequantize(DTYPE_CODE[dtype], bits, *(p.data_ptr() for p in want), out_shape.data_ptr(), out.data_ptr())
    assert torch.equal(out, dequantize_kv_ref(QuantKV(*want), bits, group, dtype))
