"""attend_merged: every available backend against the torch reference, the reference against
an independent fp64 computation, and the properties the op is for (lse combines partial
attentions; a -inf bias removes an entry; all -inf rows give 0 / -inf, never NaN).

Tolerances, from how each backend computes:
    lse: fp32 logits and sums everywhere -> rtol 1e-5, atol 1e-5, for all dtypes.
    out: the torch spec is fp32; Triton rounds the softmax weights once to the values' dtype
    before weights @ values (fp32 accumulation), so |out - ref| <= u * max|v| with u the
    dtype's unit roundoff (bf16 2^-8, fp16 2^-11): atol = 2u * max(1, max|v|) + 1e-5
    (fp32 values: u = 1e-6), rtol 1e-5.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from op_backends import op_backends
from kvplug.ops import _backend
from kvplug.ops.attend_merged import attend_merged, attend_merged_ref

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 1e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
NEG_INF = float("-inf")
# (Q, Hq, Hkv, D, E): one of each, odd sizes, GQA groups 1..4, E == 0 and 1, Q == 0, D not a
# power of two, E spanning several entry tiles (and splits), Llama-3-8B heads.
SHAPES = [(1, 1, 1, 64, 1), (7, 3, 3, 64, 5), (5, 6, 3, 128, 16), (33, 4, 1, 64, 40), (2, 32, 8, 128, 130),
          (3, 2, 2, 24, 7), (4, 4, 2, 64, 0), (0, 4, 2, 64, 9), (2, 8, 2, 80, 300), (1, 4, 1, 256, 70)]


def backends():
    return op_backends("attend_merged", cuda=False)  # no CUDA kernel: Triton serves CUDA tensors


def device_for(backend):
    # On a CUDA machine every backend, torch's too, runs on CUDA tensors.
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def make_bias(Hkv, E, g):
    """Log cluster sizes (1..16 members), exact tokens (0) and ignored entries (-inf)."""
    kind = torch.randint(3, (Hkv, E), generator=g)
    bias = torch.log(torch.randint(1, 17, (Hkv, E), generator=g).float())
    bias = torch.where(kind == 1, 0.0, bias)
    return torch.where((kind == 2) & (torch.rand(Hkv, E, generator=g) < 0.3), NEG_INF, bias)


def inputs(Q, Hq, Hkv, D, E, dtype, kv_dtype=None, seed=0, dev="cpu"):
    g = torch.Generator().manual_seed(seed * 1009 + Q * 31 + E)
    q = torch.randn(Q, Hq, D, generator=g).to(dtype)
    keys = torch.randn(Hkv, E, D, generator=g).to(kv_dtype or dtype)
    values = torch.randn(Hkv, E, D, generator=g).to(kv_dtype or dtype)
    return q.to(dev), keys.to(dev), values.to(dev), make_bias(Hkv, E, g).to(dev)


def check(got, q, keys, values, bias, scale=None):
    """got (out, lse) against attend_merged_ref on CPU, tolerance by the values' dtype."""
    out, lse = got
    Q, Hq, D = q.shape
    assert out.shape == (Q, Hq, D) and lse.shape == (Q, Hq)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.device == q.device and lse.device == q.device
    want_out, want_lse = attend_merged_ref(q.cpu(), keys.cpu(), values.cpu(), bias.cpu(), scale)
    out, lse = out.cpu(), lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    vmax = float(values.abs().max()) if values.numel() else 0.0
    atol = 2 * UNIT_ROUNDOFF[values.dtype] * max(1.0, vmax) + 1e-5
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=atol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)  # -inf must match -inf


def fp64_attention(q, keys, values, bias, scale):
    """(out, lse) in fp64 with explicit loops over kv heads: independent of the spec's code."""
    Q, Hq, D = q.shape
    G = Hq // keys.shape[0]
    out = torch.zeros(Q, Hq, D, dtype=torch.float64)
    lse = torch.full((Q, Hq), NEG_INF, dtype=torch.float64)
    for h in range(Hq):
        k, v, b = keys[h // G].double(), values[h // G].double(), bias[h // G].double()
        logits = q[:, h].double() @ k.T * scale + b  # [Q, E]
        keep = ~torch.isneginf(b)
        if keep.any():
            lk = logits[:, keep]
            mx = lk.max(dim=1, keepdim=True).values
            w = torch.exp(lk - mx)
            lse[:, h] = (mx.squeeze(1) + torch.log(w.sum(1)))
            out[:, h] = (w / w.sum(1, keepdim=True)) @ v[keep]
    return out, lse


# ---------------------------------------------------------------- the spec

def test_reference_by_hand():
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # Q=1, Hq=2, D=2
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # Hkv=1, E=3
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    bias = torch.tensor([[0.0, math.log(3.0), NEG_INF]])  # a token, a 3-member cluster, padding
    out, lse = attend_merged_ref(q, keys, values, bias, scale=1.0)
    # head 0: logits (1, log 3): weights (e, 3) / (e + 3); head 1: logits (0, 2 + log 3)
    e = math.e
    want = torch.tensor([[[e / (e + 3), 3 / (e + 3)], [1 / (1 + 3 * e * e), 3 * e * e / (1 + 3 * e * e)]]])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, torch.tensor([[math.log(e + 3), math.log(1 + 3 * e * e)]]))
    out_default, _ = attend_merged_ref(q, keys, values, bias)  # scale 1/sqrt(2)
    torch.testing.assert_close(out_default, attend_merged_ref(q, keys, values, bias, 2 ** -0.5)[0])


@pytest.mark.parametrize("Q,Hq,Hkv,D,E", [(3, 4, 2, 16, 9), (2, 6, 3, 24, 31), (1, 1, 1, 8, 1)])
def test_reference_matches_fp64(Q, Hq, Hkv, D, E):
    q, keys, values, bias = inputs(Q, Hq, Hkv, D, E, torch.float32, seed=5)
    bias[0, 0] = NEG_INF
    for scale in (None, 0.3):
        out, lse = attend_merged_ref(q, keys, values, bias, scale)
        want_out, want_lse = fp64_attention(q, keys, values, bias, D ** -0.5 if scale is None else scale)
        torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- every backend

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Q,Hq,Hkv,D,E", SHAPES)
def test_matches_reference(backend, dtype, Q, Hq, Hkv, D, E):
    dev = device_for(backend)
    q, keys, values, bias = inputs(Q, Hq, Hkv, D, E, dtype, dev=dev)
    check(attend_merged(q, keys, values, bias, backend=backend), q, keys, values, bias)
    if E > 1 and Q > 0:
        check(attend_merged(q, keys, values, bias, scale=0.7, backend=backend), q, keys, values, bias, 0.7)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("q_dtype,kv_dtype", [(torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.bfloat16)])
def test_query_and_kv_dtypes_differ(backend, q_dtype, kv_dtype):
    q, keys, values, bias = inputs(5, 6, 2, 64, 45, q_dtype, kv_dtype, dev=device_for(backend))
    check(attend_merged(q, keys, values, bias, backend=backend), q, keys, values, bias)


@pytest.mark.parametrize("backend", backends())
def test_rows_with_no_entry_give_zero_and_neg_inf(backend):
    dev = device_for(backend)
    q, keys, values, bias = inputs(3, 4, 2, 32, 70, torch.bfloat16, dev=dev)
    bias[1] = NEG_INF  # kv head 1: every entry ignored -> query heads 2, 3 see nothing
    bias[0, :64] = NEG_INF  # kv head 0: only the last tile's entries count
    out, lse = attend_merged(q, keys, values, bias, backend=backend)
    assert (out[:, 2:] == 0).all() and torch.isneginf(lse[:, 2:]).all()
    check((out, lse), q, keys, values, bias)
    for E in (0, 1):  # no entries at all; one ignored entry
        q, keys, values, _ = inputs(2, 2, 1, 16, E, torch.float32, dev=dev)
        out, lse = attend_merged(q, keys, values, torch.full((1, E), NEG_INF, device=dev), backend=backend)
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", backends())
def test_neg_inf_bias_equals_dropping_the_entry(backend):
    dev = device_for(backend)
    q, keys, values, bias = inputs(4, 4, 2, 64, 90, torch.float16, dev=dev)
    bias = bias.clamp(min=0.0)
    drop = torch.zeros(90, dtype=torch.bool)
    drop[::7] = True
    masked = bias.clone()
    masked[:, drop.to(dev)] = NEG_INF
    keep = (~drop).to(dev)
    got = attend_merged(q, keys, values, masked, backend=backend)
    want = attend_merged(q, keys[:, keep], values[:, keep], bias[:, keep], backend=backend)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=2e-3)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_lse_combines_disjoint_entry_sets(backend):
    """Attention over [A; B] is the lse-weighted mix of attention over A and over B: the
    contract that lets a caller add exact tokens to the merged ones."""
    dev = device_for(backend)
    q, keys, values, bias = inputs(3, 8, 2, 64, 100, torch.float32, dev=dev)
    full = attend_merged(q, keys, values, bias, backend=backend)
    a = attend_merged(q, keys[:, :37], values[:, :37], bias[:, :37], backend=backend)
    b = attend_merged(q, keys[:, 37:], values[:, 37:], bias[:, 37:], backend=backend)
    lse = torch.logaddexp(a[1], b[1])
    out = a[0] * torch.exp(a[1] - lse)[..., None] + b[0] * torch.exp(b[1] - lse)[..., None]
    torch.testing.assert_close(out, full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, full[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_strided_inputs(backend):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(9, 3 * 4, 64, generator=g).to(device=dev, dtype=torch.bfloat16)
    q = qkv[:, :4]  # a view into a fused qkv tensor: token and head strides not dense
    kv = torch.randn(41, 2, 2, 64, generator=g).to(device=dev, dtype=torch.bfloat16)  # [E, 2, Hkv, D]
    keys, values = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [Hkv, E, D], entry stride 2*Hkv*D
    bias = make_bias(41, 2, g).to(dev).T  # [Hkv, E] with entry stride Hkv
    check(attend_merged(q, keys, values, bias, backend=backend), q, keys, values, bias)
    q_t = torch.randn(9, 64, 4, generator=g).to(dev).transpose(1, 2)  # D not unit stride: copied
    k_t = keys.transpose(1, 2).contiguous().transpose(1, 2)
    check(attend_merged(q_t, k_t, values, bias, backend=backend), q_t, k_t, values, bias)


# ---------------------------------------------------------------- Triton specifics

def _triton_or_skip():
    if not _backend.has_triton():
        pytest.skip("triton not installed")
    from kvplug import envs
    from kvplug._triton.attend_merged import attend_merged_triton, plan

    return attend_merged_triton, plan, envs.triton_interpret()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 2, 3, 5, 64])
def test_triton_entry_splits_combine(dtype, splits):
    attend_merged_triton, _, interpret = _triton_or_skip()
    dev = device_for("triton")
    q, keys, values, bias = inputs(3, 4, 2, 64, 333, dtype, seed=splits, dev=dev)
    bias[0, :200] = NEG_INF  # whole splits see only ignored entries
    bias[1] = NEG_INF  # every split of kv head 1 is empty
    got = attend_merged_triton(q, keys, values, bias, 0.125, splits=splits, interpret=interpret)
    check(got, q, keys, values, bias, 0.125)


def test_triton_plan():
    _, plan, _ = _triton_or_skip()
    for Q, Hq, Hkv, E, D, splits in [(64, 32, 8, 16384, 128, None), (1, 32, 8, 2048, 128, None), (3, 4, 2, 0, 64, 3),
                                     (2, 2, 1, 1, 16, 9), (2, 2, 1, 333, 80, 5), (1, 1, 1, 130, 256, 100)]:
        bm, bn, bd, warps, n_split, per = plan(Q, Hq, Hkv, E, D, torch.device("cpu"), splits)
        assert bm >= 16 and bn >= 16 and bd >= max(16, D) and warps in (4, 8)
        assert per % bn == 0 and n_split >= 1
        assert n_split * per >= E and (n_split == 1 or (n_split - 1) * per < E), "no split empty, none missing"
        if splits is not None:
            assert n_split <= max(1, splits)


def test_bad_inputs_raise_value_error():
    q, k, b = torch.randn(2, 6, 16), torch.randn(4, 3, 16), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"\(2, 6, 16\).*\(4, 3, 16\)"):
        attend_merged(q, k, k, b)  # Hq=6 not a multiple of Hkv=4
    with pytest.raises(ValueError, match=r"\(2, 4, 16\).*\(2, 3, 8\)"):
        attend_merged(torch.randn(2, 4, 16), torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 16\)"):
        attend_merged(torch.randn(2, 16), k, k, b)
    with pytest.raises(ValueError, match=r"\(4, 3, 8\)"):
        attend_merged(torch.randn(2, 4, 16), k, torch.randn(4, 3, 8), b)
    with pytest.raises(ValueError, match=r"bias \(4, 2\)"):
        attend_merged(torch.randn(2, 4, 16), k, k, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="float16"):
        attend_merged(torch.randn(2, 4, 16), k, k, b.half())
    with pytest.raises(ValueError, match="keys and values one dtype"):
        attend_merged(torch.randn(2, 4, 16), k, k.half(), b)
    with pytest.raises(ValueError, match="int64"):
        attend_merged(torch.randn(2, 4, 16).long(), k, k, b)
    with pytest.raises(ValueError, match="backend"):
        attend_merged(torch.randn(2, 4, 16), k, k, b, backend="numpy")
    with pytest.raises(ValueError, match=r"\(1, 3, 4\).*\(2, 5, 4\)"):
        attend_merged_ref(torch.randn(1, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.zeros(2, 5))


def test_triton_launcher_rejects_non_unit_head_stride():
    attend_merged_triton, _, _ = _triton_or_skip()
    q = torch.randn(2, 16, 4).transpose(1, 2)  # [2, 4, 16], D stride 4
    k = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=r"q shape \(2, 4, 16\) strides"):
        attend_merged_triton(q, k, k, torch.zeros(2, 3), 0.25)
    with pytest.raises(ValueError, match=r"keys shape \(2, 3, 16\) strides"):
        attend_merged_triton(q.contiguous(), k.transpose(1, 2).contiguous().transpose(1, 2), k, torch.zeros(2, 3), 0.25)


def test_backend_choice(monkeypatch):
    q, k, b = torch.randn(2, 4, 16), torch.randn(2, 3, 16), torch.zeros(2, 3)
    if not _backend.has_cuda_op("attend_merged"):
        with pytest.raises(ValueError, match="backend 'cuda'"):
            attend_merged(q, k, k, b, backend="cuda")
    monkeypatch.setenv("KVPLUG_ATTEND_MERGED_BACKEND", "torch")
    assert _backend.choose("attend_merged", q.device) == "torch"
    check(attend_merged(q, k, k, b), q, k, k, b)


def test_fake_impl_under_compile():
    q, k, v, b = inputs(3, 4, 2, 16, 5, torch.float32)
    fn = torch.compile(lambda a, x, y, z: attend_merged(a, x, y, z, backend="torch"), fullgraph=True, backend="eager")
    check(fn(q, k, v, b), q, k, v, b)


# The interpreter accepts code that real compilation rejects: compile for sm_90 (no driver
# needed; the launch shapes plan() picks for Llama-3-8B) and check the dots with half values
# use tensor cores (wgmma).
SM90_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvplug._triton import attend_merged as am

ints = ("Q", "E", "G", "Hq", "per_split", "s_qq", "s_qh", "s_kh", "s_ke", "s_vh", "s_ve", "s_bh", "s_be", "s_os",
        "s_ls")
flags = ("D", "QK_F32", "PV_F32", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_D")
out = []
for qd, kd, D in (("bf16", "bf16", 128), ("fp16", "fp16", 64), ("fp32", "bf16", 128), ("fp32", "fp32", 80),
                  ("bf16", "bf16", 256)):
    bm, bn, bd, warps, _, _ = am.plan(64, 32, 8, 2048, D, None, 1)
    sig = {"q_ptr": "*" + qd, "k_ptr": "*" + kd, "v_ptr": "*" + kd, "b_ptr": "*fp32", "o_ptr": "*fp32",
           "lse_ptr": "*fp32", **{n: "i32" for n in ints}, "qk_scale": "fp32", **{n: "constexpr" for n in flags}}
    consts = {"D": D, "QK_F32": qd != kd or qd == "fp32", "PV_F32": kd == "fp32", "UPCAST": False,
              "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}
    k = triton.compile(ASTSource(fn=am._attend_kernel, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})
    out.append({"q": qd, "kv": kd, "D": D, "wgmma": "wgmma" in k.asm["ptx"]})
sig = {"po_ptr": "*fp32", "pl_ptr": "*fp32", "o_ptr": "*fp32", "lse_ptr": "*fp32", "S": "i32", "n_rows": "i32",
       "D": "constexpr", "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
triton.compile(ASTSource(fn=am._combine_kernel, signature=sig, constexprs={"D": 80, "BLOCK_S": 16, "BLOCK_D": 128}),
               target=GPUTarget("cuda", 90, 32))
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
    results = json.loads(proc.stdout)
    assert len(results) == 5
    for r in results:
        if r["kv"] != "fp32":  # weights @ values on tensor cores whenever values are half
            assert r["wgmma"], r
