"""The blender on the canonical KV path: the toy model of test_blender over vLLM 0.32's CUDA cache
layouts (CPU tensors, torch backend) with PagedCacheKV's all-layer methods, against the same toy
writing per layer with write_kv (the path every other adapter takes) as the oracle. The paged
caches are read back by plain indexing of [B, H, N, 2D] (K then V), not through PagedKV.
"""
from collections import Counter

import pytest
import torch

from kvplug.blend.blender import BlendJob
from kvplug.blend.paged_cache import OPTIONAL, PagedCacheKV
from kvplug.ops.kv_layout import clone_caches, make_vllm_caches
from test_blender import KV, D, L, Blender, DictStore, Toy, prompt, warm

BS, NB = 16, 9


class PagedToy(Toy):
    """Toy whose KV lives in vLLM-layout paged caches, every access through PagedCacheKV, counted."""

    def __init__(self, caches, seed=0):
        super().__init__(seed)
        self.caches, self.calls = caches, Counter()
        kv = PagedCacheKV(caches, self.rope)
        for name in ("write_kv", "read_kv", *OPTIONAL):
            setattr(self, name, self._counted(name, getattr(kv, name)))

    def _counted(self, name, fn):
        def call(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return call


def cache_kv(caches, slots):
    """[L, 2, T, KV, D] at slots, by plain indexing of each layer's [B, H, N, 2D] (K then V)."""
    b, n = slots // BS, slots % BS
    return torch.stack([torch.stack([c[b, :, n, :D], c[b, :, n, D:]]) for c in caches])


def setup(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    caches = make_vllm_caches(L, NB, BS, KV, D, torch.float32, "cpu", layout, generator=g)
    tokens, chunks, end = prompt()
    blocks = torch.randperm(NB, generator=g)[:-(-end // BS)]  # the request's blocks, out of order
    pos = torch.arange(end)
    return caches, tokens, chunks, end, blocks[pos // BS] * BS + pos % BS


def run_both(layout, ratio, start):
    """The same job on Toy (per-layer write_kv into a dict) and PagedToy; the engine holds the
    full prefill's KV of [0, start) in both. Returns (toy, paged toy, caches before, slots)."""
    caches, tokens, chunks, end, slots = setup(layout)
    toy, paged = Toy(), PagedToy(caches)
    prefix = toy.reference_kv(tokens[:end])[:, :, :start]
    for model in (toy, paged):
        blender = Blender(model, DictStore(), head_tokens=3)
        warm(blender, tokens, chunks)
        for i in range(L):
            model.write_kv(i, prefix[i, 0], prefix[i, 1], slots[:start])
        before, paged.calls = clone_caches(caches), Counter()  # the engine before the run
        blender.run(BlendJob(tokens, start, end, chunks, slots[start:end], ratio, "fixed", tail=tokens[end:end + 4],
                             prefix_slots=slots[:start]))
    return toy, paged, before, slots[start:end]


def untouched_outside(caches, before, slots):
    """Every element of the shared buffer but the K/V of `slots` is as before."""
    mask = torch.ones(caches[0]._base.shape, dtype=torch.bool)
    for c in caches:
        view = mask.as_strided(c.shape, c.stride(), c.storage_offset())
        view[slots // BS, :, slots % BS] = False
    return torch.equal(caches[0]._base[mask], before[0]._base[mask])


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
@pytest.mark.parametrize("start", [0, 7])
def test_ratio_zero_through_write_rerotated_equals_per_layer_writes(layout, start):
    toy, paged, before, slots = run_both(layout, 0.0, start)
    got, want = cache_kv(paged.caches, slots), toy.written_kv()
    assert paged.calls == Counter(write_rerotated=1)  # one fused launch; the engine's prefix is never read
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-6, atol=1e-6)  # K: two re-rotations
    assert torch.equal(got[:, 1], want[:, 1])
    assert untouched_outside(paged.caches, before, slots)


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
@pytest.mark.parametrize("ratio,start", [(1.0, 0), (1.0, 7), (0.25, 12)])
def test_recomputed_writes_through_write_kv_layers_equal_per_layer_writes(layout, ratio, start):
    toy, paged, before, slots = run_both(layout, ratio, start)
    assert torch.equal(cache_kv(paged.caches, slots), toy.written_kv())
    assert paged.calls == Counter(write_kv_layers=1, **({"read_kv_layers": 1} if start else {}))
    assert untouched_outside(paged.caches, before, slots)


def test_chunk_payload_through_read_kv_layers_equals_per_layer_reads():
    toy, paged, _, slots = run_both("LBNHC", 1.0, 0)
    paged.calls.clear()
    for b, e in ((0, 7), (27, 52)):
        want = Blender(toy).read_chunks([(slots[b:e], b)])[0]
        got = Blender(paged).read_chunks([(slots[b:e], b)])[0]
        assert torch.equal(got, want)
    assert paged.calls == Counter(read_kv_layers=2)


def test_bad_kv_for_the_paged_cache_names_the_shape():
    caches, *_ = setup("LBNHC")
    kv = PagedCacheKV(caches, Toy().rope)
    with pytest.raises(ValueError, match=r"k of shape \(3, 2, 8\) and v of shape \(3, 8\)"):
        kv.write_kv(0, torch.randn(3, KV, D), torch.randn(3, D), torch.arange(3))
    with pytest.raises(ValueError, match=r"chunk of shape \(1, 2, 3, 2, 8\) from layer 3"):
        kv.write_kv_layers(torch.randn(1, 2, 3, KV, D), torch.arange(3), first_layer=3)
