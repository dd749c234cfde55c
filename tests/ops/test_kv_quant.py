"""quantize_kv / dequantize_kv (kvplug/ops/kv_quant.py).

1. The spec's round trip, per element x of a group with stored scale s and zero z (Q = 2**bits - 1):
       |x' - x| <= s / 2 + half an ulp of the model dtype at |x'| + 2**-22 * (|z| + Q * s)
   (the last term: fp32 rounding of x - z, the division and code * s + z), and
       s <= (range + ulp_fp16(min)) / Q * (1 + 2**-10)
   so int8 is off by at most about range / 510 of its group, int4 by range / 30. Checked on random
   KV with per-channel offsets and outliers (keys) for every dtype, odd shapes, T = 0 and 1, odd
   groups and groups longer than T or D.
2. Every backend against quantize_kv_ref / dequantize_kv_ref on the same inputs: meta equal, codes
   equal except at rounding ties (at most 0.1% of codes, off by one), dequantized values equal up to
   the output dtype's rounding (interpreted Triton rounds fp32 -> bf16 toward zero: 1 ulp), strided
   inputs and outputs included.
3. Constant groups round-trip exactly (scale 0); values past fp16's range give a non-finite meta.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvplug import envs
from kvplug.ops import _backend
from kvplug.ops.kv_quant import (QuantKV, dequantize_kv, dequantize_kv_ref, quant_shapes, quantize_kv,
                                 quantize_kv_ref)

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
# (L, T, KV, D, group): odd T, T = 0 / 1, odd D (an int4 half byte), odd groups, group > T and > D
SHAPES = [(2, 37, 3, 64, 32), (1, 1, 1, 8, 4), (2, 0, 2, 16, 8), (1, 19, 2, 9, 5), (3, 130, 2, 128, 64),
          (1, 5, 1, 7, 3), (1, 3, 2, 12, 256)]


def backends(op):
    out = ["torch"]
    if _backend.has_triton() and (torch.cuda.is_available() or envs.triton_interpret()):
        out.append("triton")
    if torch.cuda.is_available() and _backend.has_cuda_op(op):
        out.append("cuda")
    return out


def device_for(backend):
    if backend == "triton" and envs.triton_interpret():
        return "cpu"
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def make_kv(L, T, KV, D, dtype, seed=0, device="cpu"):
    """Keys with per-channel offsets and a few outlier channels (what per-channel quantization is
    for), values roughly unit scale."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(L, 2, T, KV, D, generator=g)
    kv[:, 0] = kv[:, 0] * (0.5 + 2 * torch.rand(L, 1, KV, D, generator=g)) + 4 * torch.randn(L, 1, KV, D, generator=g)
    if D > 2:
        kv[:, 0, :, :, 1] *= 20
    return kv.to(dtype=dtype, device=device)


def per_element(q: QuantKV, T: int, D: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of every element [L, 2, T, KV, D], fp32."""
    km = q.k_meta.float()[:, torch.arange(T) // group]
    vm = q.v_meta.float()[..., torch.arange(D) // group, :]
    return torch.stack([km[..., 0], vm[..., 0]], 1), torch.stack([km[..., 1], vm[..., 1]], 1)


def half_ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    e = torch.floor(torch.log2(x.abs().clamp(min=2.0 ** -14)))
    return 2.0 ** (e - MANTISSA[dtype]) / 2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,T,KV,D,group", SHAPES)
def test_reference_round_trip_is_within_half_a_step(bits, dtype, L, T, KV, D, group):
    kv = make_kv(L, T, KV, D, dtype, seed=T + D)
    q = quantize_kv_ref(kv, bits, group)
    assert [tuple(p.shape) for p in q] == list(quant_shapes(L, T, KV, D, bits, group))
    back = dequantize_kv_ref(q, bits, group, dtype)
    assert back.shape == kv.shape and back.dtype == dtype
    if T == 0:
        return
    s, z = per_element(q, T, D, group)
    Q = 2 ** bits - 1
    x, y = kv.float(), back.float()
    bound = s / 2 + half_ulp(torch.maximum(x.abs(), y.abs()), dtype) + 2.0 ** -22 * (z.abs() + Q * s)
    assert bool(((y - x).abs() <= bound).all())
    # the step is the group's range over Q, up to the fp16 rounding of zero and scale
    for (mn, mx), meta in zip(group_ranges(x, group), (q.k_meta.float(), q.v_meta.float())):
        zulp = 2.0 ** (torch.floor(torch.log2(mn.abs().clamp(min=2.0 ** -14))) - 10)
        assert bool((meta[..., 0] <= (mx - mn + zulp) / Q * (1 + 2 ** -10)).all())


def group_ranges(x: torch.Tensor, group: int):
    """((min, max) of every key group [L, ngt, KV, D]), ((min, max) of every value group [L, T, KV, ngd])."""
    k, v = x[:, 0], x[:, 1]
    ks = [k[:, i:i + group] for i in range(0, k.shape[1], group)]
    vs = [v[..., i:i + group] for i in range(0, v.shape[-1], group)]
    return ((torch.stack([p.amin(1) for p in ks], 1), torch.stack([p.amax(1) for p in ks], 1)),
            (torch.stack([p.amin(-1) for p in vs], -1), torch.stack([p.amax(-1) for p in vs], -1)))


def codes_of(q: QuantKV, bits: int, D: int) -> torch.Tensor:
    c = q.codes.cpu().long()
    if bits == 8:
        return c
    return torch.stack([c & 15, c >> 4], -1).flatten(-2)[..., :D]


def assert_same_quant(got: QuantKV, want: QuantKV, bits: int, D: int):
    assert torch.equal(got.k_meta.cpu(), want.k_meta) and torch.equal(got.v_meta.cpu(), want.v_meta)
    a, b = codes_of(got, bits, D), codes_of(want, bits, D)
    diff = (a - b).abs()
    if diff.numel():
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3


def assert_same_values(got: torch.Tensor, want: torch.Tensor, dtype):
    ulps = 2 if dtype == torch.bfloat16 else 1  # interpreted Triton truncates fp32 -> bf16
    tol = 2.0 ** -MANTISSA[dtype] * ulps
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=1e-30)


@pytest.mark.parametrize("backend", backends("quantize_kv"))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,T,KV,D,group", SHAPES)
def test_quantize_matches_reference(backend, bits, dtype, L, T, KV, D, group):
    device = device_for(backend)
    kv = make_kv(L, T, KV, D, dtype, seed=T * 3 + D)
    want = quantize_kv_ref(kv, bits, group)
    before = kv.clone()
    got = quantize_kv(kv.to(device), bits, group, backend=backend)
    assert_same_quant(got, want, bits, D)
    assert torch.equal(kv, before)  # the input is read, never written (fp32: no conversion copy)


@pytest.mark.parametrize("backend", backends("dequantize_kv"))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,T,KV,D,group", SHAPES)
def test_dequantize_matches_reference(backend, bits, dtype, L, T, KV, D, group):
    device = device_for(backend)
    q = quantize_kv_ref(make_kv(L, T, KV, D, dtype, seed=T * 5 + D), bits, group)
    want = dequantize_kv_ref(q, bits, group, dtype)
    got = dequantize_kv(QuantKV(*(p.to(device) for p in q)), bits, group, dtype, backend=backend)
    assert got.shape == want.shape and got.dtype == dtype and got.device.type == device
    assert_same_values(got, want, dtype)


@pytest.mark.parametrize("backend", backends("quantize_kv"))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_input_and_output(backend, bits, dtype):
    """KV as a view of a wider buffer (padded head_dim, K/V swapped through a negative-free
    permutation of leading dims), decoded into a strided out= view."""
    device = device_for(backend)
    L, T, KV, D, group = 2, 21, 3, 10, 4
    wide = make_kv(L, T, KV, D + 6, dtype, seed=7).permute(2, 1, 0, 3, 4).contiguous().permute(2, 1, 0, 3, 4)
    kv = wide[..., :D].to(device)
    assert not kv.is_contiguous()
    want = quantize_kv_ref(kv.cpu(), bits, group)
    got = quantize_kv(kv, bits, group, backend=backend)
    assert_same_quant(got, want, bits, D)
    out = torch.zeros(L, 2, T, KV, D + 3, dtype=dtype, device=device)[..., 1:D + 1]
    assert dequantize_kv(want if device == "cpu" else QuantKV(*(p.to(device) for p in want)), bits, group, dtype,
                         out=out, backend=backend).data_ptr() == out.data_ptr()
    assert_same_values(out, dequantize_kv_ref(want, bits, group, dtype), dtype)


@pytest.mark.parametrize("backend", backends("quantize_kv"))
@pytest.mark.parametrize("bits", [8, 4])
def test_constant_groups_round_trip_exactly(backend, bits):
    device = device_for(backend)
    kv = torch.full((1, 2, 9, 2, 6), 0.3125).to(device)  # an fp16 value: zero holds it exactly
    kv[:, :, :, 1] = -2.5
    q = quantize_kv(kv, bits, 4, backend=backend)
    assert bool((q.k_meta[..., 0] == 0).all()) and bool((q.v_meta[..., 0] == 0).all())
    assert torch.equal(dequantize_kv(q, bits, 4, torch.float32, backend=backend), kv)


@pytest.mark.parametrize("backend", backends("quantize_kv"))
def test_a_group_minimum_past_fp16_range_gives_a_non_finite_meta(backend):
    device = device_for(backend)
    kv = make_kv(1, 8, 1, 8, torch.float32, seed=3)
    kv[0, 1, 2, 0, 5] = -1e6
    q = quantize_kv(kv.to(device), 8, 4, backend=backend)
    assert not bool(torch.isfinite(q.v_meta.float()).all())
    assert bool(torch.isfinite(q.k_meta.float()).all())  # the key groups do not see it


def test_bad_arguments_raise_value_errors_naming_the_shape():
    kv = make_kv(1, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="bits=3"):
        quantize_kv(kv, 3, 4)
    with pytest.raises(ValueError, match="group=0"):
        quantize_kv(kv, 8, 0)
    with pytest.raises(ValueError, match=r"kv of shape \(2, 4, 1, 8\)"):
        quantize_kv(kv[0], 8, 4)
    with pytest.raises(ValueError, match="head_dim must be contiguous"):
        quantize_kv(kv.transpose(2, 4), 8, 4)
    with pytest.raises(ValueError, match="kv of shape .* torch.int64"):
        quantize_kv(kv.long(), 8, 4)
    q = quantize_kv(kv, 8, 4)
    with pytest.raises(ValueError, match="q parts of shapes"):
        dequantize_kv(QuantKV(q.codes, q.k_meta, q.v_meta[:, :2]), 8, 4, torch.float32)
    with pytest.raises(ValueError, match="q parts of shapes"):
        dequantize_kv(q, 4, 4, torch.float32)  # int8 codes read as int4
    with pytest.raises(ValueError, match="out of shape"):
        dequantize_kv(q, 8, 4, torch.float32, out=torch.empty(1, 2, 4, 1, 8, dtype=torch.float16))


def test_backend_choice_and_override(monkeypatch):
    kv = make_kv(1, 3, 1, 8, torch.float32)
    if not _backend.has_cuda_op("quantize_kv"):
        with pytest.raises(ValueError, match="backend 'cuda'"):
            quantize_kv(kv, 8, 4, backend="cuda")
    monkeypatch.setenv("KVPLUG_QUANTIZE_KV_BACKEND", "torch")
    monkeypatch.setenv("KVPLUG_DEQUANTIZE_KV_BACKEND", "torch")
    assert _backend.choose("quantize_kv", kv.device) == "torch"
    q = quantize_kv(kv, 8, 4)
    assert_same_quant(q, quantize_kv_ref(kv, 8, 4), 8, 8)
    assert torch.equal(dequantize_kv(q, 8, 4, torch.float32), dequantize_kv_ref(q, 8, 4, torch.float32))


def test_fake_impl_under_compile():
    kv = make_kv(1, 6, 2, 8, torch.bfloat16)

    def round_trip(x):
        return dequantize_kv(quantize_kv(x, 4, 4, backend="torch"), 4, 4, torch.bfloat16, backend="torch")

    got = torch.compile(round_trip, fullgraph=True, backend="eager")(kv)
    assert torch.equal(got, dequantize_kv_ref(quantize_kv_ref(kv, 4, 4), 4, 4, torch.bfloat16))


# The interpreter accepts code that real compilation rejects: compile every kernel for sm_90 (no
# driver needed), for each dtype and bit width.
SM90_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvplug._triton import kv_quant as kq

def compile_one(fn, sig, consts):
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    return fn.__name__

out = []
i32 = lambda names: {n: "i32" for n in names}
for dt in ("*bf16", "*fp16", "*fp32"):
    for pack in (True, False):
        qf = 15.0 if pack else 255.0
        sig = {"kv_ptr": dt, "codes_ptr": "*u8", "meta_ptr": "*fp16",
               **i32(["T", "KV", "D", "C", "G", "NGT", "s_l", "s_t", "s_h"]),
               "PACK": "constexpr", "QF": "constexpr", "BLOCK_G": "constexpr", "BLOCK_C": "constexpr"}
        out.append(compile_one(kq._quant_keys_kernel, sig, {"PACK": pack, "QF": qf, "BLOCK_G": 64, "BLOCK_C": 64}))
        sig = {"kv_ptr": dt, "codes_ptr": "*u8", "meta_ptr": "*fp16",
               **i32(["T", "KV", "D", "C", "G", "NGD", "s_l", "s_w", "s_t", "s_h"]),
               "PACK": "constexpr", "QF": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"}
        out.append(compile_one(kq._quant_values_kernel, sig, {"PACK": pack, "QF": qf, "BLOCK_T": 16, "BLOCK_C": 64}))
        for is_key in (True, False):
            sig = {"codes_ptr": "*u8", "meta_ptr": "*fp16", "out_ptr": dt,
                   **i32(["T", "KV", "D", "C", "G", "NGT", "NGD", "s_l", "s_w", "s_t", "s_h"]),
                   "IS_KEY": "constexpr", "PACK": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"}
            out.append(compile_one(kq._dequant_kernel, sig, {"IS_KEY": is_key, "PACK": pack, "BLOCK_T": 16,
                                                             "BLOCK_C": 64}))
json.dump(out, sys.stdout)
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the tests above compile and run the kernels themselves")
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    proc = subprocess.run([sys.executable, "-c", SM90_SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(json.loads(proc.stdout)) == 24
