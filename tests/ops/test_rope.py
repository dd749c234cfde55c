"""rerotate_keys and rope_inv_freq.

1. Oracle: HF-style RoPE written from scratch (rotate_half / rotate_every_two, fp64) applied
   to an unrotated key at position q must equal re-rotating its position-p version to q.
   Error budget: the spec computes the angle in fp32 from the integer delta, so the angle
   is off by up to |q - p| * 2**-24 rad; plus the input rounding of fp16/bf16 keys.
2. Every backend against rerotate_keys_ref: same fp32 math, rounding may differ
   (range-reduced sin/cos, fma): fp32 1e-5 (x4 for |x| up to ~5), fp16 2e-3, bf16 1.6e-2.
"""
import pytest
import torch

from op_backends import op_backends
from kvplug import envs
from kvplug.ops.rope import rerotate_keys, rerotate_keys_ref, rope_inv_freq

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REF_TOL = {torch.float32: 4e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def backends():
    return op_backends("rerotate_keys")


def device_for(backend):
    # Interpreted Triton runs on CPU tensors; on a CUDA machine everything else runs on CUDA.
    if backend == "triton" and envs.triton_interpret():
        return "cpu"
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def hf_rope(x, pos, inv_freq, style):
    """HF's formulation, fp64: x * cos(emb) + rotate_half(x) * sin(emb) on the rotary dims."""
    r = 2 * inv_freq.numel()
    freqs = pos.double()[:, None] * inv_freq.double()[None, :]  # [T, R/2]
    if style == "neox":
        emb = torch.cat([freqs, freqs], dim=-1)
        rot = x[..., :r]
        turned = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], dim=-1)
    else:
        emb = freqs.repeat_interleave(2, dim=-1)
        rot = x[..., :r]
        turned = torch.stack([-rot[..., 1::2], rot[..., 0::2]], dim=-1).flatten(-2)
    emb = emb[:, None, :]  # broadcast over heads
    return torch.cat([rot * emb.cos() + turned * emb.sin(), x[..., r:]], dim=-1)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype,max_pos,atol", [
    (torch.float32, 2048, 1e-3), (torch.float32, 32768, 2e-2),
    (torch.float16, 2048, 8e-3), (torch.bfloat16, 2048, 5e-2)])
@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_matches_rope_applied_from_scratch(backend, style, dtype, max_pos, atol, scaling):
    device = device_for(backend)
    T, H, D, R = 33, 3, 128, 64  # partial rotary: half the head rotates
    g = torch.Generator().manual_seed(max_pos)
    x = torch.randn(T, H, D, generator=g, dtype=torch.float64)
    p = torch.randint(0, max_pos, (T,), generator=g)
    q = torch.randint(0, max_pos, (T,), generator=g)
    inv_freq = rope_inv_freq(R, 500000.0, scaling)
    k_p = hf_rope(x, p, inv_freq, style).to(dtype)
    got = rerotate_keys(k_p.to(device), p.to(device), q.to(device), inv_freq.to(device), style, backend=backend)
    want = hf_rope(x, q, inv_freq, style)
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("lead,T,H,D,R", [
    ((), 1, 1, 64, 64), ((), 7, 3, 128, 128), ((3,), 33, 1, 64, 32), ((1,), 0, 2, 64, 64), ((2, 2), 5, 3, 80, 48)])
def test_matches_reference(backend, dtype, style, lead, T, H, D, R):
    device = device_for(backend)
    g = torch.Generator().manual_seed(T * 31 + D)
    keys = torch.randn(*lead, T, H, D, generator=g).to(dtype=dtype, device=device)
    old = torch.randint(0, 8192, (T,), generator=g).to(device)
    new = torch.randint(0, 65536, (T,), generator=g).to(device)
    inv_freq = rope_inv_freq(R, 10000.0).to(device)
    want = rerotate_keys_ref(keys, old, new, inv_freq, style)
    got = rerotate_keys(keys, old, new, inv_freq, style, backend=backend)
    assert got.shape == keys.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=REF_TOL[dtype], atol=REF_TOL[dtype])
    if R < D:
        assert torch.equal(got[..., R:], keys[..., R:])  # pass-through dims are copied exactly


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_keys_in_place_and_out(backend, dtype):
    """K of a [L, 2, T, H, D] chunk (non-contiguous view), rotated in place and into out=."""
    device = device_for(backend)
    L, T, H, D = 3, 9, 3, 64
    g = torch.Generator().manual_seed(3)
    chunk = torch.randn(L, 2, T, H, D, generator=g).to(dtype=dtype, device=device)
    old = torch.randint(0, 100, (T,), generator=g).to(device)
    new = old + torch.randint(-50, 5000, (T,), generator=g).to(device)
    inv_freq = rope_inv_freq(D, 10000.0).to(device)
    want = rerotate_keys_ref(chunk[:, 0], old, new, inv_freq, "neox")
    out = torch.empty(L, 2, T, H, D, dtype=dtype, device=device)[:, 1]
    rerotate_keys(chunk[:, 0], old, new, inv_freq, "neox", out=out, backend=backend)
    torch.testing.assert_close(out, want, rtol=REF_TOL[dtype], atol=REF_TOL[dtype])
    v_before = chunk[:, 1].clone()
    assert rerotate_keys(chunk[:, 0], old, new, inv_freq, "neox", out=chunk[:, 0], backend=backend).data_ptr() \
        == chunk[:, 0].data_ptr()
    torch.testing.assert_close(chunk[:, 0], want, rtol=REF_TOL[dtype], atol=REF_TOL[dtype])
    assert torch.equal(chunk[:, 1], v_before)


@pytest.mark.parametrize("backend", backends())
def test_round_trip_is_identity(backend):
    device = device_for(backend)
    g = torch.Generator().manual_seed(9)
    keys = torch.randn(2, 17, 2, 64, generator=g).to(device)
    p = torch.randint(0, 4096, (17,), generator=g).to(device)
    q = torch.randint(0, 4096, (17,), generator=g).to(device)
    inv_freq = rope_inv_freq(64, 10000.0).to(device)
    there = rerotate_keys(keys, p, q, inv_freq, "gptj", backend=backend)
    back = rerotate_keys(there, q, p, inv_freq, "gptj", backend=backend)
    torch.testing.assert_close(back, keys, rtol=0, atol=1e-4)
    torch.testing.assert_close(rerotate_keys(keys, p, p, inv_freq, backend=backend), keys, rtol=0, atol=1e-6)


def test_inv_freq_scalings():
    base = rope_inv_freq(8, 10000.0)
    torch.testing.assert_close(base, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert torch.equal(rope_inv_freq(8, 10000.0, {"rope_type": "default"}), base)
    torch.testing.assert_close(rope_inv_freq(8, 10000.0, {"type": "linear", "factor": 4.0}), base / 4)
    llama3 = rope_inv_freq(128, 500000.0, LLAMA3)
    full = rope_inv_freq(128, 500000.0)
    assert torch.equal(llama3[:8], full[:8])  # short wavelengths kept
    torch.testing.assert_close(llama3[-8:], full[-8:] / 8)  # long ones divided by factor
    with pytest.raises(ValueError, match="dynamic"):
        rope_inv_freq(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="allowed"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(63, 10000.0)


def test_inv_freq_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for params, theta in ((LLAMA3, 500000.0), ({"rope_type": "linear", "factor": 4.0}, 10000.0)):
        cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128,
                                       max_position_embeddings=131072, rope_parameters={**params, "rope_theta": theta})
        want, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
        assert torch.equal(rope_inv_freq(128, theta, params), want)


def test_argument_errors():
    keys = torch.randn(4, 2, 64)
    pos = torch.arange(4)
    inv = rope_inv_freq(64, 10000.0)
    with pytest.raises(ValueError, match="style"):
        rerotate_keys(keys, pos, pos, inv, "llama")
    with pytest.raises(ValueError, match=r"old_pos of shape \(3,\)"):
        rerotate_keys(keys, pos[:3], pos, inv)
    with pytest.raises(ValueError, match="int64"):
        rerotate_keys(keys, pos.int(), pos, inv)
    with pytest.raises(ValueError, match="inv_freq"):
        rerotate_keys(keys, pos, pos, inv.double())
    with pytest.raises(ValueError, match="rotary_dim"):
        rerotate_keys(keys, pos, pos, rope_inv_freq(128, 10000.0))
    with pytest.raises(ValueError, match="contiguous"):
        rerotate_keys(keys.transpose(1, 2).contiguous().transpose(1, 2), pos, pos, inv)
    with pytest.raises(ValueError, match=r"\(4, 2, 64\)"):
        rerotate_keys(keys, pos, pos, inv, out=torch.empty(4, 2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="cuda"):
        rerotate_keys(keys, pos, pos, inv, backend="cuda")


def test_compiles():
    keys = torch.randn(5, 2, 64)
    old, new = torch.arange(5), torch.arange(5) + 100
    inv = rope_inv_freq(64, 10000.0)
    fn = torch.compile(lambda k: rerotate_keys(k, old, new, inv, "neox") + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(keys), rerotate_keys_ref(keys, old, new, inv) + 1)
