"""What the blender needs from a model: its layer loop, one layer at a time, and a way to write
KV into the engine's cache. kvplug/connector/model_adapter.py implements it over vLLM's own
modules; tests may implement it over a toy model.

    num_layers, num_heads, num_kv_heads, head_dim, scale, dtype, device   shapes and numbers
    rope -> (inv_freq fp32 [R/2], style "neox"|"gptj")    how keys were rotated (for re-rotation)
    embed(token_ids [T]) -> hidden [T, hidden]
    forward_layer(i, positions [T], hidden, residual, attend) -> (hidden, residual)
        runs decoder layer i; its attention is `attend(q [T, H*D], k [T, KV*D], v [T, KV*D])
        -> [T, H*D]`, with q and k already rotated at `positions`
    write_kv(i, k [T, KV, D], v [T, KV, D], slots [T] int64)    into the engine's paged cache
    read_kv(i, slots [T] int64) -> (k [T, KV, D], v [T, KV, D])  back out of it
    paged_plan: None, or [(q_pos [T_j] ascending, block_table [blocks_j])] -> plan, one pair per
        request of a batch (their queries in that order); with it
    paged_attention(i, q [T, H*D], plan) -> [T, H*D]: causal attention of each request's queries
        against what the engine's paged cache of layer i holds for it (its own kernel, faster than
        torch SDPA on CPU)
    logits(hidden [T, hidden], residual [T, hidden] | None) -> [T, vocab]   the final norm and LM head
        (optional: the quality guard's audit compares the question's next token under exact and
        blended KV; without it no blend is audited)
    all_reduce(t fp32) -> fp32 host tensor   t summed over the tensor-parallel ranks (optional; absent:
        one rank): token scores from each rank's heads are agreed before any pick
Optional, for models whose layers differ (kvplug/blend/layer_kinds.py reads them; without them
every layer has `rope` and full causal attention):
    rope_for(i) -> (inv_freq, style)    layer i's RoPE (Gemma 3: one base for sliding-window
        layers, another for global ones); keys are re-rotated per group of layers sharing one
    window(i) -> int | None             layer i's sliding window W (a query at p sees keys at
        p-W+1..p), None for full attention; every attention the blender runs honours it, and
        paged_attention must too (the engine's kernel does, per layer)
Optional (the blender looks them up with getattr and falls back to write_kv / read_kv per layer;
kvplug/blend/paged_cache.py provides them over vLLM's CUDA caches, one kernel launch each):
    write_kv_layers(kv [L', 2, T, KV, D], slots [T], first_layer=0)   layers first_layer.. at once
    write_rerotated(kv [L', 2, T, KV, D], old_pos [T], new_pos [T], slots [T], first_layer=0)
        keys re-rotated from old_pos to new_pos with the model's RoPE as they are written (used
        only when every layer has the same RoPE)
    read_kv_layers(slots [T], first_layer=0, num_layers=None) -> [L', 2, T, KV, D]
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ModelAdapter(Protocol):
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: torch.dtype
    device: torch.device

    @property
    def rope(self) -> tuple[torch.Tensor, str]: ...

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def forward_layer(self, i: int, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                      attend: Attend) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write_kv(self, i: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None: ...

    def read_kv(self, i: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    paged_plan: Callable[[list[tuple[torch.Tensor, torch.Tensor]]], object] | None

    def paged_attention(self, i: int, q: torch.Tensor, plan: object) -> torch.Tensor: ...
