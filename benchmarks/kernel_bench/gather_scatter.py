"""Cases for gather_chunks, scatter_chunks and rerotate_and_scatter (see kernel_bench's contract).

Caches are vLLM 0.32's default CUDA layout (LBNHC: per layer [B, H, N, 2D] over one buffer,
block_size 16) bf16, slots a random permutation of the whole cache (so each token's row lands
in a random block, as after real allocation). Bytes counted: the chunk once, the cache rows
once, plus slots/positions; the ceiling is a copy of the chunk into a buffer of its size. --check
refills the op's destination (gather's out, the caches) with the same noise before each run.
LMCache's multi_layer_kv_transfer runs beside gather and scatter
where `lmcache` imports (kernel_bench/_lmcache.py), on its own copy of the caches in its layout.
"""
from __future__ import annotations

import torch

import kernel_bench._lmcache as lmcache
from kernel_bench import Case, device, refill
from kvplug.ops.gather_scatter import (gather_chunks, gather_chunks_ref, rerotate_and_scatter,
                                       rerotate_and_scatter_ref, scatter_chunks, scatter_chunks_ref)
from kvplug.ops.kv_layout import make_vllm_caches, vllm_kv_views
from kvplug.ops.rope import rope_inv_freq

BACKENDS = ("torch", "triton", "cuda")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _sizes(quick: bool):
    # (layers, tokens): Llama-3-8B has 32 layers, 8 kv heads, head_dim 128.
    return [(4, 256)] if quick else [(32, 4096), (32, 32768)]


def _cases_for(L: int, T: int, H: int = 8, D: int = 128, bs: int = 16, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(T)
    nb = T // bs + 64
    raw = make_vllm_caches(L, nb, bs, H, D, dtype, dev, "LBNHC")
    raw[0]._base.normal_(generator=g)
    caches = [vllm_kv_views(r, "LBNHC") for r in raw]
    slots = torch.randperm(nb * bs, device=dev, generator=g)[:T]
    chunk = torch.randn(L, 2, T, H, D, device=dev, dtype=dtype, generator=g)
    out = torch.empty_like(chunk)
    old = torch.randint(0, 8192, (T,), device=dev, generator=g)
    new = torch.randint(0, 32768, (T,), device=dev, generator=g)
    inv_freq = rope_inv_freq(D, 500000.0, LLAMA3).to(dev)
    moved = 2 * chunk.numel() * chunk.element_size() + 8 * T
    name = f"L{L} T{T} H{H} D{D} bs{bs} {str(dtype).split('.')[-1]} LBNHC"
    ks = [k for k, _ in caches]
    peer, notes = lmcache.peer(caches, slots, chunk)
    base = raw[0]._base
    same = dict(bytes=moved, copies=[(out, chunk)])

    yield Case("gather_chunks", name, ref=lambda: gather_chunks_ref(caches, slots), **same, notes=notes,
               reset=lambda: refill(out),
               fns={**{b: (lambda b=b: gather_chunks(caches, slots, out=out, backend=b)) for b in BACKENDS},
                    **peer.get("gather", {})})
    # Scatter outputs are the written K views (V is checked by gather's round trip and the tests).
    yield Case("scatter_chunks", name, **same, reset=lambda: refill(base),
               ref=lambda: (scatter_chunks_ref(chunk, caches, slots), ks)[1],
               fns={**{b: (lambda b=b: (scatter_chunks(chunk, caches, slots, backend=b), ks)[1]) for b in BACKENDS},
                    **peer.get("scatter", {})})
    yield Case("rerotate_and_scatter", name, bytes=moved + 16 * T, copies=[(out, chunk)], reset=lambda: refill(base),
               ref=lambda: (rerotate_and_scatter_ref(chunk, old, new, inv_freq, "neox", caches, slots), ks)[1],
               fns={b: (lambda b=b: (rerotate_and_scatter(chunk, old, new, inv_freq, "neox", caches, slots,
                                                          backend=b), ks)[1]) for b in BACKENDS})


def cases(quick: bool):
    for L, T in _sizes(quick):
        yield from _cases_for(L, T)
