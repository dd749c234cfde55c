"""Relevance: the question's attention on each cached token, before anything is recomputed.

The question (the prompt after the blend span) runs alone through every layer of the model,
attending to the span's cached KV (re-rotated, approximate) and to itself; its attention weights
on the span tokens, averaged over layers, heads and question tokens, say which tokens the answer
will read (ProphetKV's first stage). It costs the question's length times the span's, a small
fraction of recomputing even a few span tokens.

    question_pass(model, tail, kv, end, start, clusters=None, top=8, at=None) -> fp32 [end - start]
        relevance of each span token; with clusters (kvplug/blend/clusters.py) the question attends
        to the cached chunks' key clusters and expands only its `top` clusters to tokens
    question_attention(q, k_span, v_span, k_own, v_own, scale) -> (out, weights)
        one layer: q [T, H, D] over the span's K/V [S, KV, D] and the question's own [T, KV, D]
        (causal); out [T, H*D] in q's dtype, weights fp32 [S] summed over heads and queries.
        Grouped heads are batched per KV head, so no key is copied per query head.
"""
from __future__ import annotations

import torch


def question_attention(q: torch.Tensor, k_span: torch.Tensor, v_span: torch.Tensor, k_own: torch.Tensor,
                       v_own: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, D = q.shape
    KV = k_span.shape[1]
    g = H // KV
    qg = q.view(T, KV, g, D).permute(1, 2, 0, 3).reshape(KV, g * T, D)  # [KV, gT, D], row = (head in group, t)
    s_span = torch.matmul(qg, k_span.permute(1, 2, 0)).float() * scale  # [KV, gT, S]
    s_own = torch.matmul(qg, k_own.permute(1, 2, 0)).float() * scale  # [KV, gT, T]
    t = torch.arange(T, device=q.device)
    future = (t[None, :] > t[:, None]).repeat(g, 1)  # [gT, T]: query t sees own keys <= t
    s_own = s_own.masked_fill(future, float("-inf"))
    top = torch.maximum(s_span.amax(-1, keepdim=True), s_own.amax(-1, keepdim=True))
    p_span, p_own = (s_span - top).exp(), (s_own - top).exp()
    z = p_span.sum(-1, keepdim=True) + p_own.sum(-1, keepdim=True)
    p_span, p_own = p_span / z, p_own / z
    out = torch.matmul(p_span.to(v_span.dtype), v_span.permute(1, 0, 2)).float() + \
        torch.matmul(p_own.to(v_own.dtype), v_own.permute(1, 0, 2)).float()  # [KV, gT, D]
    out = out.view(KV, g, T, D).permute(2, 0, 1, 3).reshape(T, H * D)
    return out.to(q.dtype), p_span.sum(dim=(0, 1))


@torch.inference_mode()
def question_pass(m, tail: list[int], kv: torch.Tensor, end: int, start: int, clusters=None,
                  top: int = 8, at: int | None = None) -> torch.Tensor:
    """The question at positions at.. (default end..) through every layer of adapter `m` over kv
    [L, 2, end, KV, D] (keys at their prompt positions); returns its mean attention on positions
    [start, end)."""
    from kvplug.blend.clusters import clustered_attention

    at = end if at is None else at
    pos = torch.arange(at, at + len(tail), device=m.device)
    hidden = m.embed(torch.tensor(tail, dtype=torch.long, device=m.device))
    residual = None
    total = torch.zeros(end, dtype=torch.float32, device=m.device)
    for i in range(m.num_layers):
        def attend(q, k, v, layer=kv[i], i=i):
            q, k = q.view(-1, m.num_heads, m.head_dim), k.view(-1, m.num_kv_heads, m.head_dim)
            v = v.view(-1, m.num_kv_heads, m.head_dim)
            if clusters is None:
                out, w = question_attention(q, layer[0], layer[1], k, v, m.scale)
            else:
                out, w = clustered_attention(q, i, clusters, layer, k, v, m.scale, top)
            total.add_(w)
            return out
        hidden, residual = m.forward_layer(i, pos, hidden, residual, attend)
    return (total / (m.num_layers * m.num_heads * len(tail)))[start:end].cpu()
