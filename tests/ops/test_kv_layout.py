"""vLLM 0.32's CUDA KV layouts as kv_layout writes them down: strides against an independent
construction (a contiguous tensor in physical order, permuted to the logical [L, B, H, N, C]),
and, where vLLM is installed, against vLLM's own enum, stride function and default choice.
"""
import pytest
import torch

from kvplug.ops.kv_layout import (DEFAULT_VLLM_LAYOUT, FLASHINFER_NAMES, VLLM_LAYOUTS, default_vllm_layout,
                                  detect_vllm_layout, make_vllm_caches, paged_spec, vllm_kv_views,
                                  vllm_layer_strides)

SHAPE = dict(L=3, B=5, H=2, N=4, D=8)


def permuted_reference(layout, L, B, H, N, D):
    """[L, B, H, N, 2D] logical view of a contiguous tensor laid out in `layout`'s physical order."""
    order = VLLM_LAYOUTS[layout]
    logical = (L, B, H, N, 2 * D)
    phys = torch.arange(L * B * H * N * 2 * D).view(*[logical[d] for d in order])
    return phys.permute(*[order.index(d) for d in range(5)])


@pytest.mark.parametrize("layout", list(VLLM_LAYOUTS))
def test_strides_match_a_permuted_contiguous_tensor(layout):
    s = SHAPE
    want = permuted_reference(layout, **s)
    assert vllm_layer_strides(layout, s["L"], s["B"], s["H"], s["N"], 2 * s["D"]) == want.stride()
    caches = make_vllm_caches(s["L"], s["B"], s["N"], s["H"], s["D"], torch.float32, "cpu", layout)
    base = caches[0].data_ptr()
    for l, cache in enumerate(caches):
        assert cache.shape == want.shape[1:] and cache.stride() == want.stride()[1:]
        assert (cache.data_ptr() - base) // 4 == l * want.stride(0)


@pytest.mark.parametrize("layout", list(VLLM_LAYOUTS))
def test_views_address_k_then_v_of_each_token(layout):
    s = SHAPE
    g = torch.Generator().manual_seed(1)
    caches = make_vllm_caches(s["L"], s["B"], s["N"], s["H"], s["D"], torch.float16, "cpu", layout, generator=g)
    for cache in caches:
        k, v = vllm_kv_views(cache, layout)
        assert k.shape == (s["B"], s["N"], s["H"], s["D"]) and k.stride(-1) == 1
        b, n, h = 3, 2, 1
        assert torch.equal(k[b, n, h], cache[b, h, n, :s["D"]]) and torch.equal(v[b, n, h], cache[b, h, n, s["D"]:])
    paged_spec([vllm_kv_views(c, layout)[0] for c in caches], [vllm_kv_views(c, layout)[1] for c in caches])


@pytest.mark.parametrize("layout", list(VLLM_LAYOUTS))
def test_the_layout_is_read_back_from_the_strides(layout):
    s = SHAPE
    caches = make_vllm_caches(s["L"], s["B"], s["N"], s["H"], s["D"], torch.bfloat16, "cpu", layout)
    assert detect_vllm_layout(caches) == layout
    # One layer has no layer stride: the layer-outer layout with the same order inside a layer.
    assert detect_vllm_layout(caches[:1]) == "L" + layout.replace("L", "")


def test_layout_detection_of_padded_separate_and_foreign_caches():
    padded = make_vllm_caches(2, 4, 16, 3, 8, torch.float16, "cpu", "LBNHC", block_pad=40)
    assert detect_vllm_layout(padded) == "LBNHC"
    # one contiguous [B, H, N, 2D] tensor per layer (as the CPU backend allocates): LBHNC by strides
    assert detect_vllm_layout([torch.empty(4, 2, 16, 16) for _ in range(2)]) == "LBHNC"
    with pytest.raises(ValueError, match=r"shape \(2, 4, 16, 2, 8\)"):  # vLLM <= 0.10's [2, nb, bs, H, D]
        detect_vllm_layout([torch.empty(2, 4, 16, 2, 8)])
    with pytest.raises(ValueError, match="no vLLM KVCacheLayout"):  # head_dim not innermost
        detect_vllm_layout([torch.empty(4, 16, 2, 16).permute(0, 2, 3, 1)[..., :16]])


def test_padded_pages_widen_the_block_stride_only():
    plain = vllm_layer_strides("LBNHC", 2, 4, 3, 16, 256)
    padded = vllm_layer_strides("LBNHC", 2, 4, 3, 16, 256, block_pad=64)
    assert padded[1] == plain[1] + 64 and padded[2:] == plain[2:] and padded[0] == 4 * padded[1]
    with pytest.raises(ValueError, match="pages"):
        vllm_layer_strides("LHBNC", 2, 4, 3, 16, 256, block_pad=64)


def test_wrong_layout_or_content_is_rejected():
    cache = make_vllm_caches(1, 4, 16, 2, 8, torch.float32, "cpu", "LBNHC")[0]
    with pytest.raises(ValueError, match="is not LBHNC"):
        vllm_kv_views(cache, "LBHNC")
    with pytest.raises(ValueError, match="2 \\* head_size"):
        vllm_kv_views(cache, head_size=4)
    with pytest.raises(ValueError, match="allowed values"):
        make_vllm_caches(1, 4, 16, 2, 8, torch.float32, "cpu", "NHD")
    with pytest.raises(ValueError, match="B, H, N"):
        vllm_kv_views(cache[0])


def test_default_layouts():
    assert default_vllm_layout() == default_vllm_layout("FLASHINFER", 9) == DEFAULT_VLLM_LAYOUT == "LBNHC"
    assert default_vllm_layout("FLASHINFER", 10) == "LBHNC"
    with pytest.raises(ValueError, match="FLASH_ATTN"):
        default_vllm_layout("XFORMERS")


def test_written_down_values_match_installed_vllm():
    layout_mod = pytest.importorskip("vllm.v1.kv_cache_layout")
    interface = pytest.importorskip("vllm.v1.kv_cache_interface")
    utils = pytest.importorskip("vllm.v1.attention.backends.utils")
    assert {m.name: m.value for m in layout_mod.KVCacheLayout} == VLLM_LAYOUTS
    assert utils._DEFAULT_LAYOUT_PREFERENCE[0].name == DEFAULT_VLLM_LAYOUT
    assert utils._FLASHINFER_LAYOUT_NAMES == FLASHINFER_NAMES
    for dtype in (torch.bfloat16, torch.float32):
        size = torch.empty((), dtype=dtype).element_size()
        for pad in (0, 96):
            spec = interface.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=dtype,
                                               page_size_padded=(2 * 16 * 128 * size + pad) if pad else None)
            for name in (("LBNHC", "LBHNC", "BLNHC", "BLHNC") if pad else VLLM_LAYOUTS):
                got = vllm_layer_strides(name, 3, 7, 2, 16, 128, block_pad=pad // size)
                want = interface.compute_layout_strides(spec, 7, 3, layout_mod.KVCacheLayout[name])
                assert tuple(x * size for x in got[:4]) == want[:4] and want[4] == 1, name
