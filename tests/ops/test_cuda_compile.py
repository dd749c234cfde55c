"""GPU code checks that need no GPU.

1. Every csrc/*.cu compiles with nvcc for sm_90. Files are globbed at test time, so ops added
   later are covered; two nvcc jobs run in parallel into a temporary directory.
2. The gather/scatter and RoPE kernels (csrc/include/kvplug/{gather_scatter,rope}.cuh) run
   on the host: the headers are compiled by g++ with the CUDA qualifiers defined away, every
   (block, thread) of a launch is called in turn (sound because those kernels use no shared
   memory, no barriers and write each element from one thread), and the results are compared
   with the torch specs. This checks the device index math, the launch geometry helpers and
   the vector-width choice; it cannot check races, occupancy, or nvcc's fast-math codegen.
3. The gather/scatter and RoPE Triton kernels compile for sm_90 (triton.compile with a
   GPUTarget, no driver needed; the interpreter used by the other tests accepts code that
   real compilation rejects), and 16-byte aligned copies compile to 128-bit loads/stores.

Flags mirror setup.py's build (torch's COMMON_NVCC_FLAGS, which forbid implicit half/bf16
conversions, and --use_fast_math). CPU wheels of torch ship the c10/cuda headers but not the
CMake-generated c10/cuda/impl/cuda_cmake_macros.h; a stand-in is supplied when it is missing.
"""
import ctypes
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from legacy_layouts import split_kv_cache
from kvplug.ops.gather_scatter import gather_chunks_ref, rerotate_and_scatter_ref, scatter_chunks_ref
from kvplug.ops.kv_layout import VLLM_LAYOUTS, base_alignment, make_vllm_caches, paged_spec, pointer_table
from kvplug.ops.rope import rerotate_keys_ref, rope_inv_freq

ROOT = Path(__file__).resolve().parents[2]
JOBS = 2
PER_FILE_TIMEOUT_S = 600


def _include_dirs(tmp: Path) -> list[str]:
    from torch.utils import cpp_extension

    dirs = [str(ROOT / "csrc" / "include"), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(d) / macros).exists() for d in dirs):
        shim = tmp / "shim"
        (shim / macros).parent.mkdir(parents=True)
        (shim / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(shim))
    return dirs


def _nvcc_command(nvcc: str, source: Path, obj: Path, includes: list[str]) -> list[str]:
    from torch.utils import cpp_extension

    return [nvcc, "-std=c++17", "-arch=sm_90", "-c", str(source), "-o", str(obj), "--use_fast_math",
            "-DTORCH_EXTENSION_NAME=_C", *cpp_extension.COMMON_NVCC_FLAGS, *(f"-I{d}" for d in includes)]


def _compile(cmd: list[str]) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PER_FILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {PER_FILE_TIMEOUT_S} s", time.monotonic() - start
    errors = "\n".join(line for line in proc.stderr.splitlines() if "error" in line.lower())
    return proc.returncode, errors or proc.stderr[-4000:], time.monotonic() - start


def test_every_cu_file_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    assert sources, "no csrc/*.cu files found"
    includes = _include_dirs(tmp_path)
    cmds = [_nvcc_command(nvcc, s, tmp_path / f"{s.stem}.o", includes) for s in sources]
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        results = list(pool.map(_compile, cmds))
    for source, (rc, _, secs) in zip(sources, results):
        print(f"{source.name}: rc={rc} {secs:.1f}s")
    failed = [f"{s.name} (rc={rc}):\n{err}" for s, (rc, err, _) in zip(sources, results) if rc != 0]
    assert not failed, "nvcc failed:\n\n" + "\n\n".join(failed)


# ---------------------------------------------------------------- host emulation (2.)

HARNESS = r"""
// Host emulation of kvplug's copy/RoPE CUDA kernels: every (block, thread) of a launch runs
// in turn as a plain function call. Sound for these kernels only: they use no shared memory,
// no __syncthreads and no cross-thread communication, and each output element is written
// by exactly one thread.
#define __global__
#define __device__
#define __host__
#include <cmath>
#include <cstdint>
#include <vector_types.h>

uint3 blockIdx, threadIdx;
dim3 blockDim;
// The device intrinsic; glibc declares a global __sincosf but does not export it, so the
// kernels' unqualified call finds this one in their namespace first.
namespace kvplug {
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
}  // namespace kvplug

#include "kvplug/gather_scatter.cuh"

namespace {
using namespace kvplug;

template <typename F>
void launch(dim3 grid, int threads, F kernel) {
  blockDim = dim3(threads, 1, 1);
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x)
      for (int t = 0; t < threads; ++t) {
        blockIdx = uint3{x, y, 0};
        threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
        kernel();
      }
}

template <typename V>
void copy(int to_cache, const int64_t* table, const int64_t* slots, void* chunk, int64_t L, int64_t T, int H,
          int64_t D, int64_t es, const PagedView& elems) {
  const PagedView pv = gather_scatter::in_vectors(elems, es, sizeof(V));
  const gather_scatter::Tile tile = gather_scatter::copy_tile_shape(T, H, D, es, sizeof(V));
  const dim3 grid(static_cast<unsigned>(ceil_div(T, tile.tokens)), static_cast<unsigned>(2 * L));
  V* ch = static_cast<V*>(chunk);
  launch(grid, gather_scatter::kCopyThreads, [&] {
    if (to_cache) gather_scatter::scatter_kernel<V>(table, slots, ch, pv, tile);
    else gather_scatter::gather_kernel<V>(table, slots, ch, pv, tile);
  });
}

template <typename T, bool NEOX>
void rerotate_scatter(const int64_t* table, const int64_t* slots, const void* chunk, const int64_t* op,
                      const int64_t* np, const float* f, const PagedView& pv, int64_t L, int64_t Tn, int H, int D,
                      int half) {
  const dim3 grid(static_cast<unsigned>(Tn), static_cast<unsigned>(2 * L));
  launch(grid, rope::pair_threads(H, D), [&] {
    gather_scatter::rerotate_scatter_kernel<T, NEOX>(table, slots, static_cast<const T*>(chunk), op, np, f, pv, Tn,
                                                      H, D, half);
  });
}

template <typename T, bool NEOX>
void rerotate(const void* keys, const int64_t* ks, void* out, const int64_t* os, int64_t N, int64_t Tn, int H, int D,
              const int64_t* op, const int64_t* np, const float* f, int half) {
  const dim3 grid(static_cast<unsigned>(Tn), static_cast<unsigned>(N));
  const rope::Strided4 k{ks[0], ks[1], ks[2]}, o{os[0], os[1], os[2]};
  launch(grid, rope::pair_threads(H, D), [&] {
    rope::rerotate_keys_kernel<T, NEOX>(static_cast<const T*>(keys), k, static_cast<T*>(out), o, op, np, f, H, D,
                                        half, keys != out);
  });
}

// dtype: 0 fp32, 1 fp16, 2 bf16 -> calls fn with a value of that element type.
template <typename F>
void by_dtype(int dtype, F fn) {
  if (dtype == 0) fn(float{});
  else if (dtype == 1) fn(__half{});
  else fn(__nv_bfloat16{});
}
}  // namespace

extern "C" int emu_copy(int to_cache, const int64_t* table, const int64_t* slots, void* chunk, int64_t L, int64_t T,
                        int H, int64_t D, int64_t es, int64_t bs, int64_t sb, int64_t st, int64_t sh,
                        int64_t ptr_align) {
  const PagedView elems{bs, sb, st, sh};
  const auto addr = static_cast<int64_t>(reinterpret_cast<uintptr_t>(chunk));
  const int w = gather_scatter::pick_vector_bytes(D, es, sb, st, sh, ptr_align, addr);
  if (w == 16) copy<uint4>(to_cache, table, slots, chunk, L, T, H, D, es, elems);
  else if (w == 8) copy<uint2>(to_cache, table, slots, chunk, L, T, H, D, es, elems);
  else if (w == 4) copy<uint32_t>(to_cache, table, slots, chunk, L, T, H, D, es, elems);
  else copy<uint16_t>(to_cache, table, slots, chunk, L, T, H, D, es, elems);
  return w;
}

extern "C" void emu_rerotate_scatter(int dtype, int neox, const int64_t* table, const int64_t* slots,
                                     const void* chunk, const int64_t* op, const int64_t* np, const float* f,
                                     int64_t bs, int64_t sb, int64_t st, int64_t sh, int64_t L, int64_t T, int H,
                                     int D, int half) {
  const PagedView pv{bs, sb, st, sh};
  by_dtype(dtype, [&](auto zero) {
    using E = decltype(zero);
    if (neox) rerotate_scatter<E, true>(table, slots, chunk, op, np, f, pv, L, T, H, D, half);
    else rerotate_scatter<E, false>(table, slots, chunk, op, np, f, pv, L, T, H, D, half);
  });
}

extern "C" void emu_rerotate_keys(int dtype, int neox, const void* keys, const int64_t* ks, void* out,
                                  const int64_t* os, int64_t N, int64_t T, int H, int D, const int64_t* op,
                                  const int64_t* np, const float* f, int half) {
  by_dtype(dtype, [&](auto zero) {
    using E = decltype(zero);
    if (neox) rerotate<E, true>(keys, ks, out, os, N, T, H, D, op, np, f, half);
    else rerotate<E, false>(keys, ks, out, os, N, T, H, D, op, np, f, half);
  });
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float32: 4e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
I64, PTR, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path("/usr/local/cuda/include")]
    if nvcc:
        candidates.insert(0, Path(nvcc).resolve().parent.parent / "include")
    return next((c for c in candidates if (c / "cuda_fp16.h").exists()), None)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    include, cxx = _cuda_include(), shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h)")
    tmp = tmp_path_factory.mktemp("emu")
    (tmp / "harness.cpp").write_text(HARNESS)
    lib = tmp / "libemu.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{ROOT / 'csrc' / 'include'}", f"-I{include}",
                    str(tmp / "harness.cpp"), "-o", str(lib)], check=True, capture_output=True, text=True)
    dll = ctypes.CDLL(str(lib))
    dll.emu_copy.argtypes = [INT, PTR, PTR, PTR, I64, I64, INT, I64, I64, I64, I64, I64, I64, I64]
    dll.emu_copy.restype = INT
    dll.emu_rerotate_scatter.argtypes = [INT, INT, PTR, PTR, PTR, PTR, PTR, PTR, I64, I64, I64, I64, I64, I64, INT,
                                         INT, INT]
    dll.emu_rerotate_keys.argtypes = [INT, INT, PTR, PTR, PTR, PTR, I64, I64, INT, INT, PTR, PTR, PTR, INT]
    return dll


def _caches(layout, L, nb, bs, H, D, dtype, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "padded":  # [nb, bs, H, 2, D + pad]: head stride 2 * (D + pad), odd strides
        store = [torch.randn(nb, bs, H, 2, D + pad, generator=g).to(dtype) for _ in range(L)]
        return store, [(s[:, :, :, 0, :D], s[:, :, :, 1, :D]) for s in store]
    if layout in VLLM_LAYOUTS:  # vLLM 0.32: [B, H, N, 2D] per layer over one buffer
        raw = make_vllm_caches(L, nb, bs, H, D, dtype, "cpu", layout, generator=g)
        return raw, [split_kv_cache(r, layout) for r in raw]
    shape = (2, nb, bs, H, D) if layout == "flash" else (nb, 2, bs, H, D)
    raw = [torch.randn(shape, generator=g).to(dtype) for _ in range(L)]
    return raw, [split_kv_cache(r, layout) for r in raw]


def _emu_copy(emu, to_cache, chunk, caches, slots) -> int:
    ks, vs = [k for k, _ in caches], [v for _, v in caches]
    spec, table = paged_spec(ks, vs), pointer_table(ks, vs)
    L, _, T, H, D = chunk.shape
    return emu.emu_copy(int(to_cache), table.data_ptr(), slots.data_ptr(), chunk.data_ptr(), L, T, H, D,
                        chunk.element_size(), spec.block_size, spec.stride_block, spec.stride_token,
                        spec.stride_head, base_alignment(ks, vs))


# (layout, D, pad, dtype, expected vector bytes): 16-byte rows, then narrower ones forced by
# an odd head_dim or a padded head stride.
COPY_CASES = [("flash", 64, 0, torch.bfloat16, 16), ("flashinfer", 128, 0, torch.float32, 16),
              ("padded", 64, 4, torch.float16, 8), ("padded", 63, 1, torch.float32, 4),
              ("flashinfer", 63, 0, torch.float16, 2), ("LBNHC", 128, 0, torch.bfloat16, 16),
              ("BLHNC", 64, 0, torch.float16, 16)]


@pytest.mark.parametrize("layout,D,pad,dtype,vec", COPY_CASES)
@pytest.mark.parametrize("L,T,bs,H", [(1, 1, 16, 1), (3, 33, 5, 3)])
def test_emulated_gather_scatter(emu, layout, D, pad, dtype, vec, L, T, bs, H):
    nb = T // bs + 3
    raw, caches = _caches(layout, L, nb, bs, H, D, dtype, pad, seed=T)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(T))[:T]
    out = torch.full((L, 2, T, H, D), 9.0, dtype=dtype)
    assert _emu_copy(emu, False, out, caches, slots) == vec
    assert torch.equal(out, gather_chunks_ref(caches, slots))

    chunk = torch.randn(L, 2, T, H, D).to(dtype)
    if T > 2:
        slots[1] = -1
    want_raw, want = _caches(layout, L, nb, bs, H, D, dtype, pad, seed=T)
    scatter_chunks_ref(chunk, want, slots)
    _emu_copy(emu, True, chunk, caches, slots)
    for got_t, want_t in zip(raw, want_raw):
        assert torch.equal(got_t, want_t)


@pytest.mark.parametrize("dtype", list(DTYPE_CODE))
@pytest.mark.parametrize("style,R", [("neox", 128), ("gptj", 64)])
@pytest.mark.parametrize("layout", ["flash", "flashinfer", "LBNHC"])
def test_emulated_rerotate_and_scatter(emu, dtype, style, R, layout):
    L, T, bs, H, D = 2, 11, 5, 3, 128
    nb = T // bs + 2
    raw, caches = _caches(layout, L, nb, bs, H, D, dtype, seed=R)
    want_raw, want = _caches(layout, L, nb, bs, H, D, dtype, seed=R)
    g = torch.Generator().manual_seed(1)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[3] = -1
    old, new = torch.randint(0, 4096, (T,), generator=g), torch.randint(0, 32768, (T,), generator=g)
    inv_freq = rope_inv_freq(R, 500000.0)
    chunk = torch.randn(L, 2, T, H, D, generator=g).to(dtype)
    rerotate_and_scatter_ref(chunk, old, new, inv_freq, style, want, slots)
    ks, vs = [k for k, _ in caches], [v for _, v in caches]
    spec, table = paged_spec(ks, vs), pointer_table(ks, vs)
    emu.emu_rerotate_scatter(DTYPE_CODE[dtype], int(style == "neox"), table.data_ptr(), slots.data_ptr(),
                             chunk.data_ptr(), old.data_ptr(), new.data_ptr(), inv_freq.data_ptr(), bs,
                             spec.stride_block, spec.stride_token, spec.stride_head, L, T, H, D, R // 2)
    for (gk, gv), (wk, wv) in zip(caches, want):
        torch.testing.assert_close(gk, wk, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(gv, wv)
    for got_t, want_t in zip(raw, want_raw):  # padding slot and unused blocks untouched
        torch.testing.assert_close(got_t, want_t, rtol=TOL[dtype], atol=TOL[dtype])


def _strides(x):
    return (I64 * 3)(x.stride(0), x.stride(1), x.stride(2))


@pytest.mark.parametrize("dtype", list(DTYPE_CODE))
@pytest.mark.parametrize("style,D,R", [("neox", 64, 64), ("gptj", 128, 64), ("neox", 80, 48)])
@pytest.mark.parametrize("in_place", [False, True])
def test_emulated_rerotate_keys(emu, dtype, style, D, R, in_place):
    L, T, H = 3, 9, 3
    g = torch.Generator().manual_seed(D)
    chunk = torch.randn(L, 2, T, H, D, generator=g).to(dtype)
    keys = chunk[:, 0]  # strided [N, T, H, D]
    old, new = torch.randint(0, 4096, (T,), generator=g), torch.randint(0, 65536, (T,), generator=g)
    inv_freq = rope_inv_freq(R, 10000.0)
    want = rerotate_keys_ref(keys, old, new, inv_freq, style)
    out = keys if in_place else torch.empty(L, T, H, D, dtype=dtype)
    emu.emu_rerotate_keys(DTYPE_CODE[dtype], int(style == "neox"), keys.data_ptr(), _strides(keys), out.data_ptr(),
                          _strides(out), L, T, H, D, old.data_ptr(), new.data_ptr(), inv_freq.data_ptr(), R // 2)
    torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(out[..., R:], want[..., R:])


# ---------------------------------------------------------------- Triton for sm_90 (3.)

TRITON_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvplug._triton import gather_scatter as gs, rope

def compile_one(fn, sig, consts, aligned):
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    return {"kernel": fn.__name__, "consts": str(consts), "v4_load": "ld.global.v4" in ptx,
            "v4_store": "st.global.v4" in ptx}

def const(names):
    return {n: "constexpr" for n in names}

out = []
for dt in ("*bf16", "*fp16", "*fp32"):
    paged = {"block_size": "i32", "stride_b": "i32", "stride_t": "i32", "stride_h": "i32"}
    sig = {"table_ptr": "*i64", "slots_ptr": "*i64", "out_ptr": dt, "T": "i32", "H": "i32", **paged,
           **const(["D", "ALIGN16", "BLOCK_T", "BLOCK_D"])}
    for align in (True, False):
        out.append(compile_one(gs._gather_kernel, sig, {"D": 128, "ALIGN16": align, "BLOCK_T": 16,
                                                        "BLOCK_D": 128}, (0, 1, 2, 6, 7, 8)))
    sig = {"chunk_ptr": dt, "table_ptr": "*i64", "slots_ptr": "*i64", "old_ptr": "*i64", "new_ptr": "*i64",
           "inv_freq_ptr": "*fp32", "T": "i32", "H": "i32", **paged,
           **const(["D", "HALF", "NEOX", "ROTATE", "ALIGN16", "BLOCK_T", "BLOCK_D"])}
    for rotate, neox, d in ((False, True, 128), (True, True, 128), (True, False, 80)):
        out.append(compile_one(gs._scatter_kernel, sig, {"D": d, "HALF": 32, "NEOX": neox, "ROTATE": rotate,
                                                         "ALIGN16": True, "BLOCK_T": 16,
                                                         "BLOCK_D": triton.next_power_of_2(d)},
                               (0, 1, 2, 3, 4, 5, 9, 10, 11)))
    strides = {n: "i32" for n in ("sxn", "sxt", "sxh", "syn", "syt", "syh")}
    sig = {"x_ptr": dt, "y_ptr": dt, "old_ptr": "*i64", "new_ptr": "*i64", "inv_freq_ptr": "*fp32", "T": "i32",
           "H": "i32", **strides, **const(["D", "HALF", "NEOX", "BLOCK_T", "BLOCK_D"])}
    for neox in (True, False):
        out.append(compile_one(rope._rerotate_kernel, sig, {"D": 128, "HALF": 32, "NEOX": neox, "BLOCK_T": 16,
                                                            "BLOCK_D": 128}, (0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12)))
json.dump(out, sys.stdout)
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    # A fresh process: TRITON_INTERPRET (set by conftest) is read when kernels are decorated.
    # A private cache dir, so the kernels really are compiled by this run.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=PER_FILE_TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    assert len(results) == 21
    for r in results:
        aligned_copy = r["kernel"] != "_gather_kernel" or "'ALIGN16': True" in r["consts"]
        if aligned_copy:  # 16-byte aligned tiles must not fall back to scalar accesses
            assert r["v4_load"] and r["v4_store"], r
