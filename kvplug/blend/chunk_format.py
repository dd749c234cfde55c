"""The stored form of a blend chunk: what a chunk unit's bytes are, in every tier.

A chunk unit is its KV [L, 2, n, KV, D] in the model dtype, keys rotated to the chunk's own
positions 0..n-1, as raw bytes, then (when chunks are kept with key clusters) the clusters'
sidecar (kvplug/blend/clusters.py). The scheduler sizes units with `chunk_nbytes` and the worker
packs and reads them with `ChunkFormat`: one count for both halves.

    chunk_nbytes(layers, kv_heads, head_dim, itemsize, cluster_tokens, n) -> int
    ChunkFormat(layers, kv_heads, head_dim, dtype, cluster_tokens)
        .nbytes(n) -> int                   a unit of n tokens
        .pack(kv) -> uint8                  kv [L, 2, n, KV, D] (keys at 0..n-1, on the host) -> payload
        .kv(payload, n=None) -> tensor      the payload's KV viewed as [L, 2, n, KV, D] (no copy)
        .clusters(payload, n)               its key clusters, or None when units carry none
"""
from __future__ import annotations

import torch

from kvplug.blend import clusters as kc


def chunk_nbytes(layers: int, kv_heads: int, head_dim: int, itemsize: int, cluster_tokens: int, n: int) -> int:
    kv = n * 2 * layers * kv_heads * head_dim * itemsize
    side = kc.sidecar_bytes(layers, kv_heads, head_dim, n, cluster_tokens, itemsize) if cluster_tokens else 0
    return kv + side


class ChunkFormat:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, cluster_tokens: int = 0):
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.cluster_tokens = cluster_tokens

    def nbytes(self, n: int) -> int:
        return chunk_nbytes(self.layers, self.kv_heads, self.head_dim, self.dtype.itemsize, self.cluster_tokens, n)

    def _kv_bytes(self, n: int) -> int:
        return chunk_nbytes(self.layers, self.kv_heads, self.head_dim, self.dtype.itemsize, 0, n)

    @torch.inference_mode()
    def pack(self, kv: torch.Tensor) -> torch.Tensor:
        flat = kv.contiguous().reshape(-1).view(torch.uint8)
        if not self.cluster_tokens:
            return flat
        return torch.cat([flat, kc.pack(kc.cluster_chunk(kv, self.cluster_tokens))])

    def kv(self, payload: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """ValueError when the size fits no token count (or not n)."""
        n = self._tokens_of(payload.numel()) if n is None else n
        if n <= 0 or self.nbytes(n) != payload.numel():
            raise ValueError(f"{payload.numel()} bytes are not a stored chunk of {n} tokens")
        kv = payload[: self._kv_bytes(n)]
        return kv.view(self.dtype).view(self.layers, 2, n, self.kv_heads, self.head_dim)

    def clusters(self, payload: torch.Tensor, n: int):
        if not self.cluster_tokens:
            return None
        return kc.unpack(payload[self._kv_bytes(n):], self.layers, self.kv_heads, self.head_dim, n,
                         self.cluster_tokens, self.dtype)

    def _tokens_of(self, nbytes: int) -> int:
        n = nbytes // self._kv_bytes(1)
        while n > 0 and self.nbytes(n) > nbytes:  # the sidecar makes a token cost more
            n -= 1
        return n
