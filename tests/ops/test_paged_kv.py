"""PagedKV: the blender's cached-KV write (one fused re-rotate + scatter over every layer) into
vLLM 0.32's CUDA cache layouts, against rerotate_keys_ref and plain indexing, every backend.

The chunk arrives as the blender holds it: a slice of a larger KV tensor (non-contiguous), the
positions the engine already holds marked with slot -1, from a later layer onwards. Tolerance:
V and untouched bytes exact, K as in test_gather_scatter (the kernels' sin/cos may round apart).
"""
import pytest
import torch

from kvplug.ops.kv_layout import clone_caches, make_vllm_caches
from kvplug.ops.paged_kv import PagedKV, write_rerotated_ref
from kvplug.ops.rope import rope_inv_freq
from test_gather_scatter import DTYPES, TOL, backends, device_for

# (layers, tokens, block_size, kv heads, head_dim, layout, first_layer)
CASES = [(3, 13, 16, 2, 64, "LBNHC", 1), (2, 9, 4, 1, 128, "LBHNC", 0), (3, 7, 8, 2, 64, "BLNHC", 2),
         (2, 1, 16, 2, 64, "BLHNC", 0)]


def setup_case(L, T, bs, H, D, layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = (T + bs - 1) // bs + 2
    caches = make_vllm_caches(L, nb, bs, H, D, dtype, device, layout, generator=g)
    # The blender's KV of [0, T + 3): the first three positions are the engine's, never written.
    kv = torch.randn(L, 2, T + 3, H, D, generator=g).to(dtype)
    slots = torch.cat([torch.full((3,), -1), torch.randperm(nb * bs, generator=g)[:T]])
    old = torch.randint(0, 512, (T + 3,), generator=g)
    new = torch.randint(0, 32768, (T + 3,), generator=g)
    return caches, kv, slots, old, new


def assert_layers_close(got, want, dtype):
    for g, w in zip(got, want):
        D = g.shape[-1] // 2
        torch.testing.assert_close(g[..., :D], w[..., :D], rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(g[..., D:], w[..., D:])


@pytest.mark.parametrize("backend", backends("rerotate_and_scatter"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,T,bs,H,D,layout,first", CASES)
def test_write_rerotated_matches_plain_indexing(backend, dtype, L, T, bs, H, D, layout, first):
    caches, kv, slots, old, new = setup_case(L, T, bs, H, D, layout, dtype, device_for(backend), seed=T)
    inv_freq = rope_inv_freq(D, 500000.0)
    chunk = kv[first:]  # a view: layers first.. of the blender's KV
    want = clone_caches(caches)
    write_rerotated_ref(PagedKV(want, layout).views[first:], chunk, old, new, inv_freq, "neox", slots)
    PagedKV(caches, layout).write_rerotated(chunk, old, new, inv_freq, "neox", slots, first_layer=first,
                                            backend=backend)
    assert_layers_close(caches, want, dtype)


@pytest.mark.parametrize("backend", backends("scatter_chunks"))
@pytest.mark.parametrize("L,T,bs,H,D,layout,first", CASES[:2])
def test_write_then_read_round_trips(backend, L, T, bs, H, D, layout, first):
    caches, kv, slots, _, _ = setup_case(L, T, bs, H, D, layout, torch.bfloat16, device_for(backend))
    before = clone_caches(caches)
    paged = PagedKV(caches, layout)
    paged.write(kv[first:, :, 3:].transpose(3, 4).contiguous().transpose(3, 4), slots[3:], first_layer=first,
                backend=backend)
    got = paged.read(slots[3:], first_layer=first, backend="torch")
    assert torch.equal(got.cpu(), kv[first:, :, 3:])
    for layer in range(first):  # layers before first_layer are untouched
        assert torch.equal(caches[layer], before[layer])


def test_write_rerotated_with_no_move_is_a_plain_write():
    caches, kv, slots, old, _ = setup_case(2, 11, 16, 2, 64, "LBNHC", torch.float32, "cpu")
    a, b = clone_caches(caches), clone_caches(caches)
    PagedKV(a).write_rerotated(kv, old, old, rope_inv_freq(64, 10000.0), "gptj", slots, backend="torch")
    PagedKV(b).write(kv, slots, backend="torch")
    assert_layers_close(a, b, torch.float32)


def test_bad_inputs_name_the_shape():
    caches, kv, slots, old, new = setup_case(2, 5, 16, 2, 64, "LBNHC", torch.float16, "cpu")
    paged = PagedKV(caches, "LBNHC")
    with pytest.raises(ValueError, match=r"\(2, 2, 8, 2, 64\) from layer 1"):
        paged.write(kv, slots, first_layer=1)
    with pytest.raises(ValueError, match="expected"):
        paged.write(kv.float(), slots)
    with pytest.raises(ValueError, match="is not LBHNC"):
        PagedKV(caches, "LBHNC")
    with pytest.raises(ValueError, match="layers"):
        paged.read(slots[3:], first_layer=2)
    with pytest.raises(ValueError, match="old_pos"):
        paged.write_rerotated(kv, old[:2], new, rope_inv_freq(64, 1e4), "neox", slots)
