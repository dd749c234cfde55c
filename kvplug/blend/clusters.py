"""Key clusters of a chunk, made when the chunk is stored, for the relevance pass at long contexts.

Each layer's keys of a chunk are clustered per KV head (k-means, kvplug.ops.kmeans_keys); a
cluster keeps its member mean key (the centroid), its member mean value and log(members)
(kvplug.ops.merge_clusters). They travel with the chunk unit, after its KV bytes (the sidecar),
so a chunk loaded from any tier brings them. Keys are stored at the chunk's own positions 0..n-1;
since RoPE rotates every member of a chunk by the same angle when the chunk moves, the centroids
re-rotate exactly with the chunk.

At blend time the question attends to each cluster as one merged entry (kvplug.ops.attend_merged:
one entry with bias log n stands for n identical keys) instead of to every token, and only the
clusters its queries score highest (kvplug.ops.centroid_topk) are expanded back to their member
tokens (for all queries of that KV head), whose exact attention gives their relevance.

    ChunkClusters(centroids, values, log_size, assign)      one chunk, every layer
    cluster_chunk(kv [L, 2, n, KV, D], tokens_per_cluster)   -> ChunkClusters (store time)
    sidecar_bytes(layers, kv_heads, head_dim, n, tokens_per_cluster, itemsize) -> int
    pack(clusters) -> uint8 / unpack(data, layers, kv_heads, head_dim, n, tokens_per_cluster, dtype)
    SpanClusters.build(chunks, end, kinds)    the clusters of a span, re-rotated with each layer's RoPE
                                              (kinds: kvplug/blend/layer_kinds.LayerKinds), with each
                                              token's cluster and the exact positions
    clustered_attention(q, layer, span, kv_layer, k_own, v_own, scale, top)   one layer's (out, weights)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.ops.centroid_topk import centroid_topk
from kvplug.ops.kmeans import kmeans_keys
from kvplug.ops.merge_clusters import merge_clusters

KMEANS_ITERS = 4


@dataclass
class ChunkClusters:
    centroids: torch.Tensor  # [L, KV, C, D] model dtype, keys at the chunk's positions 0..n-1
    values: torch.Tensor  # [L, KV, C, D] member mean values
    log_size: torch.Tensor  # fp32 [L, KV, C], -inf for an empty cluster
    assign: torch.Tensor  # int16 [L, KV, n]: the cluster of each token


def n_clusters(n: int, tokens_per_cluster: int) -> int:
    return max(1, -(-n // tokens_per_cluster))


@torch.inference_mode()
def cluster_chunk(kv: torch.Tensor, tokens_per_cluster: int, seed: int = 0) -> ChunkClusters:
    """Every layer at once: the ops cluster per head, so layers x KV heads are the heads of one call."""
    L, _, n, KV, D = kv.shape
    C = n_clusters(n, tokens_per_cluster)
    keys = kv[:, 0].permute(1, 0, 2, 3).reshape(n, L * KV, D)
    values = kv[:, 1].permute(1, 0, 2, 3).reshape(n, L * KV, D)
    # Random distinct keys as the start: kmeans++ picks centres one after another, C steps per chunk.
    _, assign, _ = kmeans_keys(keys, C, iters=KMEANS_ITERS, seed=seed, init="random")
    mk, mv, log_size = merge_clusters(keys, values, assign, C)
    return ChunkClusters(mk.view(L, KV, C, D), mv.view(L, KV, C, D), log_size.view(L, KV, C),
                         assign.to(torch.int16).view(L, KV, n))


def sidecar_bytes(layers: int, kv_heads: int, head_dim: int, n: int, tokens_per_cluster: int, itemsize: int) -> int:
    C = n_clusters(n, tokens_per_cluster)
    return layers * kv_heads * (2 * C * head_dim * itemsize + 4 * C + 2 * n)


def pack(c: ChunkClusters) -> torch.Tensor:
    parts = [c.centroids, c.values, c.log_size.float(), c.assign.to(torch.int16)]
    return torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in parts])


def unpack(data: torch.Tensor, layers: int, kv_heads: int, head_dim: int, n: int, tokens_per_cluster: int,
           dtype: torch.dtype) -> ChunkClusters:
    C = n_clusters(n, tokens_per_cluster)
    want = sidecar_bytes(layers, kv_heads, head_dim, n, tokens_per_cluster, dtype.itemsize)
    if data.numel() != want:
        raise ValueError(f"cluster sidecar of {data.numel()} bytes: expected {want}")
    sizes = [layers * kv_heads * C * head_dim * dtype.itemsize] * 2 + [layers * kv_heads * C * 4]
    a, b, c = sizes[0], sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]
    shape = (layers, kv_heads, C, head_dim)
    return ChunkClusters(data[:a].view(dtype).view(shape), data[a:b].view(dtype).view(shape),
                         data[b:c].view(torch.float32).view(layers, kv_heads, C),
                         data[c:].view(torch.int16).view(layers, kv_heads, n))


@dataclass
class SpanClusters:
    """The clusters of a span's cached chunks at their prompt positions, every layer."""
    centroids: torch.Tensor  # [L, KV, C, D], re-rotated to the chunks' positions
    values: torch.Tensor  # [L, KV, C, D]
    log_size: torch.Tensor  # fp32 [L, KV, C]
    assign: torch.Tensor  # int64 [L, KV, N]: the cluster (0..C-1) of each clustered token
    positions: torch.Tensor  # int64 [N]: the prompt position of each clustered token
    exact: torch.Tensor  # int64 [X]: positions < end attended to token by token (in no cluster)

    @classmethod
    def build(cls, chunks: list[tuple[int, ChunkClusters]], end: int, kinds) -> "SpanClusters":
        """chunks: (prompt position of the chunk's first token, its clusters), inside [0, end)."""
        cents, vals, logs, assigns, positions = [], [], [], [], []
        covered = torch.zeros(end, dtype=torch.bool)
        base = 0
        for begin, c in chunks:
            L, KV, C, D = c.centroids.shape
            n = c.assign.shape[-1]
            rot = c.centroids.permute(0, 2, 1, 3).contiguous()  # [L, C, KV, D]: rotate as tokens at position 0
            zero = torch.zeros(C, dtype=torch.long, device=rot.device)
            kinds.rerotate(rot, zero, zero + begin)
            cents.append(rot.permute(0, 2, 1, 3))
            vals.append(c.values)
            logs.append(c.log_size.float())
            assigns.append(c.assign.long() + base)
            positions.append(torch.arange(begin, begin + n))
            covered[begin:begin + n] = True
            base += C
        return cls(torch.cat(cents, 2), torch.cat(vals, 2), torch.cat(logs, 2), torch.cat(assigns, 2),
                   torch.cat(positions), torch.nonzero(~covered).flatten())


def clustered_attention(q: torch.Tensor, layer: int, span: SpanClusters, kv_layer: torch.Tensor, k_own: torch.Tensor,
                        v_own: torch.Tensor, scale: float, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The question's attention at one layer through the span's clusters.

    q [T, H, D]; kv_layer [2, end, KV, D] (exact positions' and members' K/V come from it);
    k_own, v_own [T, KV, D] the question's own (causal). Per KV head, the clusters any of its
    query heads ranks in its `top` are expanded to their member tokens for every query of that
    head; every other cluster is one merged entry. Returns (out [T, H*D] in q's dtype, weights
    fp32 [end]): the attention weights of the expanded tokens summed over heads and queries."""
    from kvplug.ops.attend_merged import attend_merged

    T, H, D = q.shape
    KV = k_own.shape[1]
    g = H // KV
    _, idx = centroid_topk(q, span.centroids[layer], top)  # [T, H, k]
    x = span.exact.to(kv_layer.device)
    outs, lses, expanded = [], [], []
    for h in range(KV):
        chosen = torch.zeros(span.centroids.shape[2], dtype=torch.bool)
        chosen[idx[:, h * g:(h + 1) * g].reshape(-1)] = True
        members = span.positions[chosen[span.assign[layer, h]]]  # tokens of the chosen clusters
        exact = torch.cat([members, x])
        keys = torch.cat([span.centroids[layer, h][~chosen], kv_layer[0, exact, h]])[None]
        values = torch.cat([span.values[layer, h][~chosen], kv_layer[1, exact, h]])[None]
        bias = torch.cat([span.log_size[layer, h][~chosen], torch.zeros(exact.numel())])[None]
        o, lse = attend_merged(q[:, h * g:(h + 1) * g], keys, values, bias, scale=scale)
        outs.append(o)
        lses.append(lse)
        expanded.append(members)
    out_span, lse_span = torch.cat(outs, 1), torch.cat(lses, 1)  # [T, H, D], [T, H]
    out_own, lse_own = _causal_own(q, k_own, v_own, scale)
    lse = torch.logaddexp(lse_span, lse_own)
    out = out_span * (lse_span - lse).exp().unsqueeze(-1) + out_own * (lse_own - lse).exp().unsqueeze(-1)
    weights = torch.zeros(kv_layer.shape[1], dtype=torch.float32)
    for h, members in enumerate(expanded):
        s = torch.einsum("tgd,md->tgm", q[:, h * g:(h + 1) * g].float(), kv_layer[0, members, h].float()) * scale
        weights.index_add_(0, members, (s - lse[:, h * g:(h + 1) * g, None]).exp().sum(dim=(0, 1)))
    return out.to(q.dtype).reshape(T, H * D), weights


def _causal_own(q, k, v, scale):
    T, H, D = q.shape
    g = H // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = torch.einsum("thd,shd->hts", q.float(), kk) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)  # [H, T]
    out = torch.einsum("hts,shd->thd", (s - lse.unsqueeze(-1)).exp(), vv)
    return out, lse.transpose(0, 1)
