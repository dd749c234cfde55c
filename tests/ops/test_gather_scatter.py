"""gather_chunks / scatter_chunks / rerotate_and_scatter: every available backend against
the torch reference, on vLLM 0.32's CUDA layouts (per layer [B, H, N, 2D] over one buffer:
LBNHC, the Hopper default, LBHNC for FlashInfer on Blackwell, block-outer BLNHC) and the older
FlashAttention ([2, nb, bs, H, D]) and FlashInfer ([nb, 2, bs, H, D]) caches; every K/V view is
non-contiguous. On a CUDA machine every backend runs on CUDA tensors.

Tolerances: gather and scatter are copies, compared bit-exact. rerotate_and_scatter does
fp32 math like the reference but may differ in rounding (range-reduced sin/cos, fused
multiply-add): V is bit-exact, K within one output ulp-ish (fp32 1e-5, fp16 2e-3, bf16 1.6e-2).
"""
import pytest
import torch

from legacy_layouts import split_kv_cache
from op_backends import op_backends
from kvplug import envs
from kvplug.ops.gather_scatter import (gather_chunks, gather_chunks_ref, rerotate_and_scatter,
                                       rerotate_and_scatter_ref, scatter_chunks, scatter_chunks_ref)
from kvplug.ops.kv_layout import VLLM_LAYOUTS, clone_caches, make_vllm_caches, paged_spec
from kvplug.ops.rope import rope_inv_freq

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (L, T, block_size, H, D, layout); interpreted Triton is slow, so sizes stay small.
CASES = [
    (1, 1, 16, 1, 64, "flash"),
    (3, 7, 5, 3, 128, "flashinfer"),
    (1, 33, 16, 3, 64, "flashinfer"),
    (3, 33, 5, 1, 128, "flash"),
    (2, 0, 16, 2, 64, "flash"),
    (3, 21, 16, 2, 64, "LBNHC"),
    (2, 9, 4, 3, 128, "LBHNC"),
    (3, 17, 8, 1, 64, "BLNHC"),
]


def backends(op):
    return op_backends(op)


def device_for(backend):
    # Interpreted Triton reads the pointer table as host addresses: CPU tensors only.
    if backend == "triton" and envs.triton_interpret():
        return "cpu"
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def make_caches(L, T, bs, H, D, layout, dtype, device, seed=0):
    """L layers of random caches with room for T tokens plus spare blocks, and T distinct slots."""
    g = torch.Generator().manual_seed(seed)
    nb = (T + bs - 1) // bs + 3
    if layout in VLLM_LAYOUTS:
        raw = make_vllm_caches(L, nb, bs, H, D, dtype, device, layout, generator=g)
    else:
        shape = (2, nb, bs, H, D) if layout == "flash" else (nb, 2, bs, H, D)
        raw = [torch.randn(shape, generator=g).to(dtype=dtype, device=device) for _ in range(L)]
    slots = torch.randperm(nb * bs, generator=g)[:T].to(device)
    chunk = torch.randn(L, 2, T, H, D, generator=g).to(dtype=dtype, device=device)
    return raw, slots, chunk


def views(raw, layout):
    return [split_kv_cache(r, layout) for r in raw]


@pytest.mark.parametrize("backend", backends("gather_chunks"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,T,bs,H,D,layout", CASES)
def test_gather_matches_reference(backend, dtype, L, T, bs, H, D, layout):
    raw, slots, _ = make_caches(L, T, bs, H, D, layout, dtype, device_for(backend), seed=T + L)
    caches = views(raw, layout)
    want = gather_chunks_ref(caches, slots)
    got = gather_chunks(caches, slots, backend=backend)
    assert got.shape == (L, 2, T, H, D) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want)
    out = torch.full_like(want, 7.0)
    assert gather_chunks(caches, slots, out=out, backend=backend) is out
    assert torch.equal(out, want)


def _scatter_into_copies(raw, layout, fn, *args, **kw):
    copies = clone_caches(raw)
    fn(*args, views(copies, layout), **kw)
    return copies


@pytest.mark.parametrize("backend", backends("scatter_chunks"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,T,bs,H,D,layout", CASES)
def test_scatter_matches_reference(backend, dtype, L, T, bs, H, D, layout):
    raw, slots, chunk = make_caches(L, T, bs, H, D, layout, dtype, device_for(backend), seed=T + 2 * L)
    if T > 2:
        slots[1] = -1  # padding: skipped
        slots[T - 1] = -1
    want = _scatter_into_copies(raw, layout, scatter_chunks_ref, chunk, slots=slots)
    got = _scatter_into_copies(raw, layout, scatter_chunks, chunk, slots=slots, backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # written slots match, every other byte untouched


@pytest.mark.parametrize("backend", backends("rerotate_and_scatter"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,T,bs,H,D,layout", CASES)
@pytest.mark.parametrize("style,rotary_frac", [("neox", 1.0), ("gptj", 0.5)])
def test_rerotate_and_scatter_matches_reference(backend, dtype, L, T, bs, H, D, layout, style, rotary_frac):
    device = device_for(backend)
    raw, slots, chunk = make_caches(L, T, bs, H, D, layout, dtype, device, seed=T + 3 * L)
    if T > 2:
        slots[2] = -1
    g = torch.Generator().manual_seed(T)
    old = torch.randint(0, 4096, (T,), generator=g).to(device)
    new = torch.randint(0, 32768, (T,), generator=g).to(device)
    inv_freq = rope_inv_freq(int(D * rotary_frac), 500000.0).to(device)
    before = chunk.clone()
    want = _scatter_into_copies(raw, layout, rerotate_and_scatter_ref, chunk, old, new, inv_freq, style, slots=slots)
    got = _scatter_into_copies(raw, layout, rerotate_and_scatter, chunk, old, new, inv_freq, style, slots=slots,
                               backend=backend)
    assert torch.equal(chunk, before)
    for gr, wr in zip(views(got, layout), views(want, layout)):
        torch.testing.assert_close(gr[0], wr[0], rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(gr[1], wr[1])


@pytest.mark.parametrize("backend", backends("scatter_chunks"))
def test_round_trip_strided_heads(backend):
    """Caches whose head stride is padded (D contiguous, nothing else): scatter then gather."""
    device = device_for(backend)
    L, T, nb, bs, H, D = 2, 9, 4, 5, 3, 64
    g = torch.Generator().manual_seed(5)
    store = [torch.randn(nb, bs, H, 2, D + 8, generator=g).to(device) for _ in range(L)]
    caches = [(s[:, :, :, 0, :D], s[:, :, :, 1, :D]) for s in store]
    slots = torch.randperm(nb * bs, generator=g)[:T].to(device)
    chunk = torch.randn(L, 2, T, H, D, generator=g).to(device)
    scatter_chunks(chunk, caches, slots, backend=backend)
    assert torch.equal(gather_chunks(caches, slots, backend=backend), chunk)


def test_gather_rejects_padding_and_out_of_range_slots():
    raw, slots, _ = make_caches(1, 4, 16, 1, 64, "flash", torch.float32, "cpu")
    caches = views(raw, "flash")
    with pytest.raises(ValueError, match="slots"):
        gather_chunks(caches, torch.tensor([0, -1]), backend="torch")
    with pytest.raises(ValueError, match="slots"):
        scatter_chunks(torch.zeros(1, 2, 1, 1, 64), caches, torch.tensor([10_000]), backend="torch")
    with pytest.raises(ValueError, match="int64"):
        gather_chunks(caches, torch.tensor([0, 1], dtype=torch.int32), backend="torch")


def test_shape_dtype_and_layout_errors():
    raw, slots, chunk = make_caches(2, 3, 16, 2, 64, "flash", torch.float16, "cpu")
    caches = views(raw, "flash")
    with pytest.raises(ValueError, match=r"\(2, 2, 3, 2, 64\)"):
        scatter_chunks(chunk.float(), caches, slots, backend="torch")
    with pytest.raises(ValueError, match="contiguous"):
        scatter_chunks(chunk.transpose(3, 4).contiguous().transpose(3, 4), caches, slots, backend="torch")
    mixed = [caches[0], split_kv_cache(raw[1].transpose(0, 1).contiguous(), "flashinfer")]
    with pytest.raises(ValueError, match="all layers must match"):
        gather_chunks(mixed, slots, backend="torch")
    with pytest.raises(ValueError, match="head_dim must be contiguous"):
        paged_spec([raw[0][0].transpose(2, 3)], [raw[0][1].transpose(2, 3)])
    with pytest.raises(ValueError, match="allowed values"):
        split_kv_cache(raw[0], "paged")
    with pytest.raises(ValueError, match="expected"):
        split_kv_cache(raw[0].transpose(0, 1), "flash")
    with pytest.raises(ValueError, match="cuda"):
        gather_chunks(caches, slots, backend="cuda")


def test_split_layouts_address_the_same_slot():
    flash = torch.randn(2, 4, 5, 3, 8)
    k, v = split_kv_cache(flash, "flash")
    fi_k, fi_v = split_kv_cache(flash.transpose(0, 1).contiguous(), "flashinfer")
    assert torch.equal(k, fi_k) and torch.equal(v, fi_v)
    assert not fi_k.is_contiguous() and fi_k.stride(-1) == 1


def test_env_override_and_compile(monkeypatch):
    """KVPLUG_<OP>_BACKEND picks the backend; the custom ops trace under torch.compile."""
    raw, slots, chunk = make_caches(2, 5, 4, 2, 64, "flashinfer", torch.float32, "cpu")
    caches = views(raw, "flashinfer")
    monkeypatch.setenv("KVPLUG_GATHER_CHUNKS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="cuda"):
        gather_chunks(caches, slots)
    monkeypatch.delenv("KVPLUG_GATHER_CHUNKS_BACKEND")

    def move(chunk, caches, slots):
        scatter_chunks(chunk, caches, slots)
        return gather_chunks(caches, slots) * 2

    compiled = torch.compile(move, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(chunk, caches, slots), chunk * 2)
