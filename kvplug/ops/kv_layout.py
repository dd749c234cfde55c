"""Describing vLLM paged KV caches for the chunk gather/scatter kernels.

The kernels see a paged cache as per layer one K view and one V view, each
`[num_blocks, block_size, kv_heads, head_dim]` with arbitrary strides on the block, token and
head dims but `head_dim` contiguous. Token slot `s = block_id * block_size + offset` (vLLM's
slot_mapping) lives at `view[s // block_size, s % block_size]`.

vLLM 0.32's CUDA backends (read from its source; file and function named at VLLM_LAYOUTS):
one backing buffer for all layers; each layer's registered cache tensor is the logical
`[B, H, N, C]` (blocks, kv heads, tokens of a block, content) with C = K then V of one
(head, token), `2 * head_dim` elements, and strides that follow the resolved `KVCacheLayout`:
a permutation of `[L, B, H, N, C]`. FlashAttention and FlashInfer read the same tensor:
`cache.transpose(1, 2).split(head_dim, -1)` -> K, V `[B, N, H, D]` views. The default on
Hopper (H100/H200), for both backends, is LBNHC (FlashInfer's "NHD"); FlashInfer on
Blackwell (sm100) asks for LBHNC ("HND") or BLHNC. (Older vLLM layouts, [2, nb, bs, H, D] and
[nb, 2, bs, H, D], are the kernels' tests' stride variety: tests/ops/legacy_layouts.py.)

Methods:
    vllm_kv_views(cache, layout=None, head_size=None)   vLLM 0.32 [B, H, N, 2D] -> (k, v) [B, N, H, D]
    default_vllm_layout(backend, capability_major)      the layout vLLM resolves with no override
    detect_vllm_layout(caches)       which KVCacheLayout registered [B, H, N, 2D] caches follow
    vllm_layer_strides(layout, L, B, H, N, C, block_pad)  element strides of [L, B, H, N, C]
    make_vllm_caches(L, num_blocks, block_size, H, D, dtype, device, layout, ...)  as vLLM allocates
    clone_caches(caches)             a copy with the same strides (over a copy of the shared buffer)
    paged_spec(k_caches, v_caches)   validate the views, return their shared PagedSpec
    pointer_table(k_caches, v_caches) int64 tensor [2L] of base addresses, K/V interleaved
    base_alignment(k_caches, v_caches) byte alignment shared by all base addresses
    check_slots(slots, num_slots, allow_skip)  raise on out-of-range slots
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# vLLM 0.32, vllm/v1/kv_cache_layout.py, class KVCacheLayout: each member's value is the
# physical (outer -> inner) order of the logical dims [L, B, H, N, C] of one cache group.
# vllm/v1/kv_cache_interface.py, compute_layout_strides / create_kv_cache_views: the strides
# follow that order over one backing buffer, with the layer and block strides fixed by the
# KVCacheTensor (page padding widens the block stride); AttentionSpec.state_content_size_bytes:
# C = head_size + head_size_v elements, K first.
VLLM_LAYOUTS: dict[str, tuple[int, int, int, int, int]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}
# vllm/v1/attention/backends/utils.py, _DEFAULT_LAYOUT_PREFERENCE: the first entry is used
# when no backend declares a supported set; FlashAttentionBackend declares none (inherits
# AttentionBackend.supported_kv_cache_layouts -> None). FlashInferBackend.
# supported_kv_cache_layouts (backends/flashinfer.py) returns (LBHNC, BLHNC) on compute
# capability 10.x and None elsewhere. VLLM_KV_CACHE_LAYOUT or a connector's
# get_required_kvcache_layout override it (resolve_kv_cache_layout).
DEFAULT_VLLM_LAYOUT = "LBNHC"
# backends/utils.py, _FLASHINFER_LAYOUT_NAMES (LHBNC has no FlashInfer name).
FLASHINFER_NAMES = {"LBNHC": "NHD", "LBHNC": "HND", "BLHNC": "HND", "BLNHC": "NHD", "BHLNC": "HND"}
_L, _B, _H, _N, _C = range(5)


def default_vllm_layout(backend: str = "FLASH_ATTN", capability_major: int = 9) -> str:
    """The KVCacheLayout vLLM 0.32 resolves for `backend` ("FLASH_ATTN" or "FLASHINFER") on a
    GPU of that compute capability, when neither VLLM_KV_CACHE_LAYOUT nor a connector asks."""
    if backend not in ("FLASH_ATTN", "FLASHINFER"):
        raise ValueError(f"backend={backend!r}: allowed values are FLASH_ATTN, FLASHINFER")
    return "LBHNC" if backend == "FLASHINFER" and capability_major == 10 else DEFAULT_VLLM_LAYOUT


def _vllm_order(layout: str) -> tuple[int, ...]:
    if layout not in VLLM_LAYOUTS:
        raise ValueError(f"layout={layout!r}: allowed values are {', '.join(VLLM_LAYOUTS)}")
    return VLLM_LAYOUTS[layout]


def vllm_layer_strides(layout: str, L: int, B: int, H: int, N: int, C: int,
                       block_pad: int = 0) -> tuple[int, int, int, int, int]:
    """Element strides of the logical [L, B, H, N, C] under `layout`, as vLLM's
    compute_layout_strides makes them; block_pad extra elements per page (page_size_padded)
    apply where the page ends (the inner of the L and B dims) and only when H, N, C are inner."""
    order = _vllm_order(layout)
    shape = (L, B, H, N, C)
    strides = [0] * 5
    run = 1
    page_end = max(order.index(_L), order.index(_B))
    for pos in range(4, -1, -1):
        dim = order[pos]
        if pos == page_end and block_pad:
            if page_end != 1:
                raise ValueError(f"block_pad needs a layout whose pages are the inner dims, not {layout}")
            run += block_pad
        strides[dim] = run
        run *= shape[dim]
    return tuple(strides)


def make_vllm_caches(num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_size: int,
                     dtype: torch.dtype, device, layout: str = DEFAULT_VLLM_LAYOUT, block_pad: int = 0,
                     generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per-layer [B, H, N, 2*head_size] cache tensors over one shared buffer, strided as vLLM
    0.32's allocate_kv_cache (vllm/v1/worker/utils.py) makes them for `layout`. Random data
    (standard normal) when a generator is given, else uninitialised. For tests and benchmarks."""
    C = 2 * head_size
    strides = vllm_layer_strides(layout, num_layers, num_blocks, num_heads, block_size, C, block_pad)
    total = 1 + sum((n - 1) * s for n, s in zip((num_layers, num_blocks, num_heads, block_size, C), strides))
    if generator is not None:
        raw = torch.randn(total, generator=generator).to(dtype=dtype, device=device)
    else:
        raw = torch.empty(total, dtype=dtype, device=device)
    return [raw.as_strided((num_blocks, num_heads, block_size, C), strides[1:], l * strides[0])
            for l in range(num_layers)]


def detect_vllm_layout(caches) -> str:
    """The KVCacheLayout (a VLLM_LAYOUTS name) that per-layer caches [B, H, N, 2D] follow, read
    from their strides; the layer dim from how far apart layers 0 and 1 start in their shared
    buffer (separate buffers, or one layer: layers outermost). Size-1 dims fit any place; the
    default layout is tried first. ValueError naming the shape and strides when none fits.
    Strides only: a CPU backend's [B, H, N, 2D] reads as LBHNC but may pack its blocks."""
    first = caches[0] if len(caches) else None
    if first is None or first.dim() != 4 or first.shape[3] % 2 or first.shape[3] == 0:
        raise ValueError(f"kv cache of shape {None if first is None else tuple(first.shape)}: expected vLLM's "
                         "[B, H, N, 2*head_size] per layer")
    sizes = (len(caches), *first.shape)
    strides = [math.inf, *first.stride()]
    if len(caches) > 1 and caches[1].untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
        strides[_L] = caches[1].storage_offset() - first.storage_offset()
    for name in (DEFAULT_VLLM_LAYOUT, *(n for n in VLLM_LAYOUTS if n != DEFAULT_VLLM_LAYOUT)):
        sized = [strides[d] for d in VLLM_LAYOUTS[name] if sizes[d] > 1]
        if strides[_C] == 1 and all(a > b for a, b in zip(sized, sized[1:])):
            return name
    raise ValueError(f"kv cache of shape {tuple(first.shape)} strides {first.stride()} (layer stride "
                     f"{strides[_L]}): no vLLM KVCacheLayout has this memory order")


def clone_caches(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of per-layer cache tensors with their strides kept. Tensors that are views of one
    buffer (make_vllm_caches) are re-made over one copy of it: torch's clone() would make a
    block-outer layer view contiguous, i.e. another layout."""
    base = caches[0]._base
    if base is None or any(c._base is not base for c in caches):
        return [c.clone() for c in caches]
    copy = base.clone()
    return [copy.as_strided(c.shape, c.stride(), c.storage_offset()) for c in caches]


def _check_vllm_order(cache: torch.Tensor, layout: str) -> None:
    """The strides of a [B, H, N, C] view decrease along `layout`'s physical order (size-1
    dims are free), so a cache of another layout is never read as this one."""
    order = [d - 1 for d in _vllm_order(layout) if d != _L]
    sized = [(cache.stride(d), d) for d in order if cache.shape[d] > 1]
    if any(a[0] < b[0] for a, b in zip(sized, sized[1:])) or cache.stride(3) != 1:
        raise ValueError(f"kv cache of shape {tuple(cache.shape)} strides {cache.stride()} is not "
                         f"{layout} (physical order {''.join('BHNC'[d] for d in order)})")


def vllm_kv_views(cache: torch.Tensor, layout: str | None = None,
                  head_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) [B, N, H, D] views of one vLLM 0.32 layer cache [B, H, N, 2D], exactly as
    FlashAttentionImpl.do_kv_cache_update splits it (kv_cache.transpose(1, 2).split(head_size,
    -1)); with `layout`, the strides must follow it. No copy is made."""
    if cache.dim() != 4:
        raise ValueError(f"kv cache of shape {tuple(cache.shape)}: expected vLLM's [B, H, N, 2*head_size]")
    d = cache.shape[3] // 2 if head_size is None else head_size
    if cache.shape[3] != 2 * d or d < 1:
        raise ValueError(f"kv cache of shape {tuple(cache.shape)}: content dim must be 2 * head_size "
                         f"(K then V of equal size), head_size={head_size}")
    if layout is not None:
        _check_vllm_order(cache, layout)
    kv = cache.transpose(1, 2)
    return kv[..., :d], kv[..., d:]


@dataclass(frozen=True)
class PagedSpec:
    """What every K and V view of a model shares; strides are in elements."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    stride_block: int
    stride_token: int
    stride_head: int
    dtype: torch.dtype
    device: torch.device

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def paged_spec(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> PagedSpec:
    """Check that all 2L views have one shape, one stride set, one dtype and device,
    and a contiguous head_dim; the kernels take one stride set for all layers."""
    if len(k_caches) == 0 or len(k_caches) != len(v_caches):
        raise ValueError(f"kv caches: {len(k_caches)} K views and {len(v_caches)} V views, expected L >= 1 of each")
    first = k_caches[0]
    if first.dim() != 4:
        raise ValueError(f"kv cache view of shape {tuple(first.shape)}: expected [num_blocks, block_size, H, D]")
    if first.dtype not in DTYPES:
        raise ValueError(f"kv cache dtype {first.dtype}: supported are {DTYPES}")
    for i, view in enumerate([*k_caches, *v_caches]):
        if view.shape != first.shape or view.stride() != first.stride():
            raise ValueError(
                f"kv cache view {i} has shape {tuple(view.shape)} strides {view.stride()}, "
                f"view 0 has {tuple(first.shape)} strides {first.stride()}: all layers must match")
        if view.dtype != first.dtype or view.device != first.device:
            raise ValueError(f"kv cache view {i} is {view.dtype} on {view.device}, "
                             f"view 0 is {first.dtype} on {first.device}")
    if first.stride(3) != 1 and first.shape[3] > 1:
        raise ValueError(f"kv cache view of shape {tuple(first.shape)} strides {first.stride()}: "
                         "head_dim must be contiguous")
    nb, bs, h, d = first.shape
    return PagedSpec(len(k_caches), nb, bs, h, d, first.stride(0), first.stride(1), first.stride(2),
                     first.dtype, first.device)


def base_alignment(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> int:
    """Largest power of two <= 16 dividing every view's base address, in bytes (the CUDA
    copies pick their vector width from it). Reads data_ptr: call it outside traced code."""
    align = 16
    for view in [*k_caches, *v_caches]:
        ptr = view.data_ptr()
        align = min(align, (ptr & -ptr) or 16)
    return align


# Pointer tables are cached by (device, addresses): vLLM allocates its caches once, so
# the host->device copy happens on the first call (before any CUDA graph capture) only.
_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 64


def pointer_table(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
    """int64 [2L] on the caches' device: entry 2*l is layer l's K base address, 2*l+1 its V.

    The addresses stay valid only while the views' storages live; callers keep them alive."""
    ptrs = []
    for k, v in zip(k_caches, v_caches):
        ptrs += [k.data_ptr(), v.data_ptr()]
    key = (str(k_caches[0].device), tuple(ptrs))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = torch.tensor(ptrs, dtype=torch.int64).to(k_caches[0].device)
        _TABLES[key] = table
    return table


def check_slots(slots: torch.Tensor, num_slots: int, allow_skip: bool) -> None:
    """Raise unless every slot is in [0, num_slots) (or -1 when allow_skip).

    On CPU this raises ValueError; on CUDA it is a device-side assert
    (torch._assert_async) so the hot path never waits for the GPU. Data dependent: the
    dispatchers call it inside their custom ops, where torch.compile does not trace."""
    if slots.dim() != 1 or slots.dtype != torch.int64:
        raise ValueError(f"slots of shape {tuple(slots.shape)} dtype {slots.dtype}: expected int64 [T]")
    if slots.numel() == 0:
        return
    low = -1 if allow_skip else 0
    ok = (slots >= low) & (slots < num_slots)
    if slots.device.type == "cuda":
        torch._assert_async(ok.all(), "kvplug: slot out of range")
    elif not bool(ok.all()):
        bad = slots[~ok][:4].tolist()
        allowed = "-1 or " if allow_skip else ""
        raise ValueError(f"slots {bad}...: each must be {allowed}in [0, {num_slots})")
