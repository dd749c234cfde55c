"""Relevance: the question's attention on each cached token, before anything is recomputed.

The question (the prompt after the blend span) runs alone through every layer of the model,
attending to the span's cached KV (re-rotated, approximate) and to itself; its attention weights
on the span tokens, averaged over layers, heads and question tokens, say which tokens the answer
will read (ProphetKV's first stage). It costs the question's length times the span's, a small
fraction of recomputing even a few span tokens. The questions of a batch of blends run as one
pass: one forward_layer call per layer over all of them, attention per question over its own KV.

    QuestionItem(tail, at, kv, end, start, clusters=None)   one question and the KV it reads
    question_passes(model, items, top=8)   generator (yields after each layer) returning, per item,
        fp32 [end - start]: the relevance of each span token (attention averaged over the item's
        `layers`: all of them, the last half, or the most concentrated one); with clusters
        (kvplug/blend/clusters.py) the question attends to the cached chunks' key clusters and
        expands only its `top` clusters to tokens; a sliding-window layer (the adapter's window(i),
        kvplug/blend/layer_kinds.py) attends exactly to the keys in its window, clusters or not
    question_logits(model, items)          generator returning fp32 [items, vocab]: the logits after
        each question's last token over its kv (the blend audit compares exact and blended KV)
    drain(steps) -> value                  a generator of steps run to its end
    question_attention(q, k_span, v_span, k_own, v_own, scale, window=None, at=0) -> (out, weights)
        one layer: q [T, H, D] at positions at.. over the span's K/V [S, KV, D] (positions 0..S-1)
        and the question's own [T, KV, D] (causal; with a window W, only keys less than W
        positions back); out [T, H*D] in q's dtype, weights fp32 [S] summed over heads and
        queries. Grouped heads are batched per KV head, so no key is copied per query head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug.blend.layer_kinds import LayerKinds, window_mask


LAYERS = ("all", "late", "peak")  # every layer; the last half (A3); the one where it is most concentrated


@dataclass
class QuestionItem:
    tail: list[int]  # the question's tokens
    at: int  # the prompt position of tail[0] (>= end)
    kv: torch.Tensor  # [L, 2, end, KV, D], keys at their prompt positions
    end: int
    start: int  # relevance is returned for positions [start, end)
    clusters: object = None  # SpanClusters for a long span, else None: every token attended to
    layers: str = "all"  # which layers' attention counts: one of LAYERS


def question_attention(q: torch.Tensor, k_span: torch.Tensor, v_span: torch.Tensor, k_own: torch.Tensor,
                       v_own: torch.Tensor, scale: float, window: int | None = None,
                       at: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, D = q.shape
    S, KV = k_span.shape[0], k_span.shape[1]
    g = H // KV
    lo = 0 if window is None else min(S, max(0, at - window + 1))  # span keys no query's window reaches
    k_span, v_span = k_span[lo:], v_span[lo:]
    qg = q.view(T, KV, g, D).permute(1, 2, 0, 3).reshape(KV, g * T, D)  # [KV, gT, D], row = (head in group, t)
    s_span = torch.matmul(qg, k_span.permute(1, 2, 0)).float() * scale  # [KV, gT, S - lo]
    s_own = torch.matmul(qg, k_own.permute(1, 2, 0)).float() * scale  # [KV, gT, T]
    t = torch.arange(T, device=q.device)
    s_own = s_own.masked_fill(~window_mask(t, t, window).repeat(g, 1), float("-inf"))  # own keys <= t
    if window is not None:
        seen = window_mask(t + at, torch.arange(lo, S, device=q.device), window).repeat(g, 1)
        s_span = s_span.masked_fill(~seen, float("-inf"))
    top = s_own.amax(-1, keepdim=True)  # finite: a query always sees its own key
    if s_span.shape[-1]:
        top = torch.maximum(top, s_span.amax(-1, keepdim=True))
    p_span, p_own = (s_span - top).exp(), (s_own - top).exp()
    z = p_span.sum(-1, keepdim=True) + p_own.sum(-1, keepdim=True)
    p_span, p_own = p_span / z, p_own / z
    out = torch.matmul(p_span.to(v_span.dtype), v_span.permute(1, 0, 2)).float() + \
        torch.matmul(p_own.to(v_own.dtype), v_own.permute(1, 0, 2)).float()  # [KV, gT, D]
    out = out.view(KV, g, T, D).permute(2, 0, 1, 3).reshape(T, H * D)
    weights = p_span.sum(dim=(0, 1))
    if lo:
        weights = torch.cat([torch.zeros(lo, dtype=weights.dtype, device=weights.device), weights])
    return out.to(q.dtype), weights


def question_passes(m, items: list[QuestionItem], top: int = 8):
    """Every item's question at positions at.. through every layer of adapter `m` over its kv;
    returns (as the generator's value) each one's mean attention on positions [start, end)."""
    totals, sizes, _ = yield from _questions(m, items, top, weigh=True)
    return [_by_layers(total[:, it.start:it.end] / (m.num_heads * n), it.layers).cpu()
            for it, n, total in zip(items, sizes, totals)]


def _by_layers(per_layer: torch.Tensor, layers: str) -> torch.Tensor:
    """[span] relevance from [L, span] per-layer attention: the mean over every layer, over the last
    half, or the single layer whose attention over the span is most concentrated (lowest entropy)."""
    if layers == "all":
        return per_layer.mean(0)
    if layers == "late":
        return per_layer[per_layer.shape[0] // 2:].mean(0)
    p = per_layer / per_layer.sum(-1, keepdim=True).clamp(min=1e-30)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
    return per_layer[int(entropy.argmin())]


def question_logits(m, items: list[QuestionItem]):
    """Every item's question through every layer over its kv; returns (as the generator's value)
    fp32 [len(items), vocab]: the model's logits after each question's last token (the adapter's
    logits: final norm and LM head)."""
    _, sizes, (hidden, residual) = yield from _questions(m, items, 0, weigh=False)
    last = torch.tensor(sizes).cumsum(0) - 1
    rows = last.to(hidden.device)
    return m.logits(hidden[rows], None if residual is None else residual[rows]).float()


def _questions(m, items: list[QuestionItem], top: int, weigh: bool):
    """The layer loop of both: (attention totals per item, question sizes, final (hidden, residual))."""
    from kvplug.blend.clusters import clustered_attention

    sizes = [len(it.tail) for it in items]
    pos = torch.cat([torch.arange(it.at, it.at + len(it.tail)) for it in items]).to(m.device)
    ids = torch.tensor([t for it in items for t in it.tail], dtype=torch.long, device=m.device)
    hidden, residual = m.embed(ids), None
    totals = [torch.zeros((m.num_layers, it.end), dtype=torch.float32, device=m.device) if weigh else None
              for it in items]
    kinds = LayerKinds.of(m)
    for i in range(m.num_layers):
        window = kinds.window(i)

        def attend(q, k, v, i=i, window=window):
            q, k = q.view(-1, m.num_heads, m.head_dim), k.view(-1, m.num_kv_heads, m.head_dim)
            v = v.view(-1, m.num_kv_heads, m.head_dim)
            outs, row = [], 0
            for it, n, total in zip(items, sizes, totals):
                qs, ks, vs, layer = q[row:row + n], k[row:row + n], v[row:row + n], it.kv[i]
                if it.clusters is None or window is not None or not weigh:  # a window reaches few keys: exactly
                    out, w = question_attention(qs, layer[0], layer[1], ks, vs, m.scale, window, it.at)
                else:
                    out, w = clustered_attention(qs, i, it.clusters, layer, ks, vs, m.scale, top)
                if weigh:
                    total[i].add_(w.to(total.device))
                outs.append(out)
                row += n
            return torch.cat(outs)
        hidden, residual = m.forward_layer(i, pos, hidden, residual, attend)
        yield
    return totals, sizes, (hidden, residual)


def drain(steps):
    """Run a generator of steps (question_passes, Blender.stepwise's) to its end; its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
