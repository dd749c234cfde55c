"""Where the worker's units keep their canonical K/V tokens, for the cold tiers' KV codecs
(disk_codec / remote_codec, kvplug/tiers/codec.py).

    canonical block rows   [L, 2, T, KV, D] tokens already (CUDA caches, PagedBlockIO): a reshape
    opaque block rows      the engine's block bytes, every layer (vLLM's CPU backend, ISA-packed): K and V
                           elements in the order the backend's own write op puts them, learned once by
                           probing it (vllm_compat.PagedKVReader); the codec gathers them into canonical
                           tokens and scatters them back, so a stored block round-trips to engine bytes
    chunks                 canonical KV [L, 2, n, KV, D], then the key-cluster sidecar (kept as it is)

    tier_codecs(specs, io_kind, io, raw_caches, facts, layout) -> ({tier name: UnitCodec}, views):
        the codecs of the configured tiers that have one, over one shared {layout: view} (the block
        rows' view under `layout`, when the backend has one)
    add_chunk_view(views, layout, fmt)         once the blender exists (its ChunkFormat)
    block_views(io_kind, io, raw_caches, facts, layout) -> (views, why-not or "")
"""
from __future__ import annotations

import logging

import torch

from kvplug.connector import vllm_compat
from kvplug.tiers.codec import PermutedView, TokensView, UnitCodec, make_codec

logger = logging.getLogger("kvplug")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def block_views(io_kind: str, io, raw_caches, facts, layout: str) -> tuple[dict, str]:
    """The block rows' view under `layout`, or no view and why (the codec then keeps blocks out of
    its tier: the byte budgets count blocks at their encoded size)."""
    if io_kind == "canonical":
        L, _, T, H, D = io.row_shape
        return {layout: TokensView(L, H, D, io.spec.dtype, tokens=T)}, ""
    try:
        return {layout: _opaque_view(io, raw_caches, facts)}, ""
    except (ValueError, RuntimeError) as e:  # any backend we cannot probe: no view, never a failed start
        return {}, str(e)


def _opaque_view(io, raw_caches, facts) -> PermutedView:
    (shape, dtype), rest = io.templates[0], io.templates[1:]
    if any(t != (shape, dtype) for t in rest) or dtype not in _DTYPES:
        raise ValueError(f"layers' blocks differ or their dtype {dtype} is not fp32/fp16/bf16")
    cache = raw_caches[0]
    per_block = cache.shape[0] // facts.num_blocks  # kernel blocks in one of vLLM's blocks
    if per_block < 1 or facts.block_size % per_block:
        raise ValueError(f"cache of shape {tuple(cache.shape)} does not split {facts.num_blocks} blocks evenly")
    attn = vllm_compat.attention_layer(facts.layer_names[0])
    if attn is None:
        raise ValueError(f"no attention layer {facts.layer_names[0]!r} in vLLM's forward context")
    kbs = facts.block_size // per_block
    reader = vllm_compat.PagedKVReader(attn, cache, facts.kv_heads, facts.head_dim, kbs)
    kernel_elems = cache[0].numel()
    t = torch.arange(facts.block_size)
    base = ((t // kbs) * kernel_elems)[:, None].to(reader.k_index.device)
    k_index = (base + reader.k_index[t % kbs]).cpu()
    v_index = (base + reader.v_index[t % kbs]).cpu()
    return PermutedView(facts.num_layers, facts.kv_heads, facts.head_dim, dtype, facts.block_size, k_index, v_index)


def add_chunk_view(views: dict, layout: str, fmt) -> None:
    """Chunk units of `layout` in the ChunkFormat `fmt`: their KV, then the clusters' sidecar."""
    token_bytes = 2 * fmt.layers * fmt.kv_heads * fmt.head_dim * fmt.dtype.itemsize
    if fmt.dtype in _DTYPES:
        views[layout] = TokensView(fmt.layers, fmt.kv_heads, fmt.head_dim, fmt.dtype,
                                   tail_nbytes=lambda n: fmt.nbytes(n) - n * token_bytes)


def tier_codecs(specs, io_kind: str, io, raw_caches, facts, layout: str):
    """({tier name: UnitCodec}, views) for the tiers whose spec names a codec; the views are probed
    only when a codec is on, and one warning says so when blocks cannot be encoded."""
    codecs = {name: c for name, spec in specs.items() if (c := make_codec(spec.codec)) is not None}
    views, why_not = block_views(io_kind, io, raw_caches, facts, layout) if codecs else ({}, "")
    for name, codec in codecs.items():
        if why_not:
            logger.warning("kvplug: %s_codec=%s: prefix blocks cannot be encoded on this backend (%s); only chunks "
                           "are stored in that tier", name, codec.name, why_not)
    on = list(codecs.values())
    shared = {c: UnitCodec(c, views, sharers=on.count(c)) for c in set(on)}  # tiers with one codec: encoded once
    return {name: shared[c] for name, c in codecs.items()}, views
