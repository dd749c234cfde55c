"""Which cached tokens of a blended span get their KV recomputed: a policy built from parts.

A blended span holds cached chunks (KV computed in another context, keys re-rotated) and
tokens that are always recomputed (chunks too short to cache). A policy (`Selection`) picks,
within a budget of `recompute_ratio` x the cached tokens, which cached tokens the blender runs
again through the model so that their KV sees the new context. Parts, one function each:

    chunk_heads(offsets, begins, n)             the always-recompute set: the first n tokens of every
                                                chunk after the first (EPIC / LegoLink: a chunk cached
                                                on its own starts with sink-like tokens; separators
                                                sit there too)
    deviation(k, k_cached, v, v_cached, which)  per-token KV deviation at the check layer (CacheBlend:
                                                tokens whose KV drifts most), K, V or both
    relevance (computed by the blender)         the question's attention on each cached token
                                                (ProphetKV: a deviating token the question never
                                                reads cannot change the answer)
    combine(relevance, deviation, weight)       both as rank percentiles, mixed
    global_budget / per_chunk_budget / adaptive_budget / relevance_budget   how the budget is split
    pick_tokens(scores, groups, budgets, always)         the tokens to recompute

Named policies (`POLICIES`, the values of `recompute_policy`):
    fixed     CacheBlend: top deviation (K and V) over all cached tokens, at the check layer
    adaptive  Cache-Craft: fixed's scores, the budget split over chunks by how much each depends
              on its new context x how much the question reads it
    epic      chunk heads first, the rest of the budget by deviation (EPIC + CacheBlend)
    query     chunk heads first, the rest by the question's attention (ProphetKV); nothing runs
              on all tokens, so it costs least (the default: best measured, README "Blending")
    mixed     chunk heads, then relevance and deviation mixed half and half
    a3        A3 (Zhou et al. 2025): the question's attention in the last half of the layers, the
              budget split over chunks by how much of it each chunk gets, chunk heads first
    critical  QCFuse's "critical layer": the question's attention in the one layer where it is most
              concentrated (lowest entropy over the span), chunk heads first
Every policy spends at most round(ratio x cached tokens): ratio 0 recomputes nothing (the
re-rotated concatenation), ratio 1 everything (a full prefill).

How the budget is split (Cache-Craft's adaptive estimator). A chunk's cached KV was computed in
another context; in the new prompt its tokens attend to whatever precedes the chunk now. (1) The
share of their attention that goes there (`outside_mass`, fresh queries at the check layer) is
how much their KV can have changed: a chunk at position 0 has share 0 and its cached KV is
exact. (2) The share of the question's attention that lands on the chunk (`relevance`) is how
much an error there can matter. The budget is split in proportion to (1) x (2), each chunk
capped at its own size; what a cap cuts off is not handed on, so adaptive never recomputes more
than fixed.
"""
from __future__ import annotations

import torch

from kvplug.blend.policies import POLICIES, Selection  # noqa: F401 - re-exported


def chunk_heads(offsets: torch.Tensor, first_chunk: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [T]: token t is one of the first n of its chunk (offsets[t] < n), and its chunk is not
    the prompt's first (first_chunk[t] False). offsets: int64 [T] position inside the chunk."""
    return (offsets < n) & ~first_chunk


def deviation(k: torch.Tensor, k_cached: torch.Tensor, v: torch.Tensor, v_cached: torch.Tensor,
              which: str = "kv") -> torch.Tensor:
    """fp32 [T]: sum of squared differences of fresh vs cached K, V or both ([T, KV, D] each)."""
    from kvplug.ops.deviation_topk import deviation_topk

    if which == "k":
        return deviation_topk(k, k_cached, 0)[0]
    if which == "v":
        return deviation_topk(v, v_cached, 0)[0]
    return deviation_topk(k, k_cached, 0, v, v_cached)[0]


def rank_pct(x: torch.Tensor) -> torch.Tensor:
    """fp32 [T] in (0, 1]: the rank of each value among x, 1 = the largest (ties by index)."""
    if x.numel() == 0:
        return x.float()
    ranks = torch.empty(x.numel(), dtype=torch.float32)
    ranks[torch.argsort(x.float(), stable=True)] = torch.arange(1, x.numel() + 1, dtype=torch.float32)
    return ranks / x.numel()


def combine(relevance: torch.Tensor, dev: torch.Tensor, weight: float) -> torch.Tensor:
    """weight x rank(relevance) + (1 - weight) x rank(deviation): scales need not agree."""
    return weight * rank_pct(relevance) + (1.0 - weight) * rank_pct(dev)


def global_budget(chunk_of: torch.Tensor, ratio: float) -> tuple[torch.Tensor, list[int]]:
    """CacheBlend: one budget, round(ratio x cached tokens), over every cached token: (groups, [budget])."""
    pooled = torch.where(chunk_of >= 0, 0, -1)
    return pooled, [round(ratio * int((chunk_of >= 0).sum()))]


def per_chunk_budget(chunk_of: torch.Tensor, n_chunks: int, ratio: float) -> list[int]:
    """round(ratio x its tokens) for every cached chunk (never more than the global budget + 1/2 per chunk)."""
    return [round(ratio * int((chunk_of == c).sum())) for c in range(n_chunks)]


def adaptive_budget(chunk_sizes: list[int], outside_mass: list[float], relevance: list[float],
                    ratio: float) -> list[int]:
    if not len(chunk_sizes) == len(outside_mass) == len(relevance):
        raise ValueError(f"{len(chunk_sizes)} chunks, {len(outside_mass)} attention shares, "
                         f"{len(relevance)} relevances")
    weights = [max(m, 0.0) * max(r, 0.0) for m, r in zip(outside_mass, relevance)]
    total = sum(weights)
    if total <= 0:
        return [0] * len(chunk_sizes)
    budget = ratio * sum(chunk_sizes)
    # floor (plus float slack), so the sum never exceeds the global round(ratio x tokens)
    return [min(n, int(budget * w / total + 1e-9)) for n, w in zip(chunk_sizes, weights)]


def relevance_budget(chunk_sizes: list[int], relevance: list[float], budget: int,
                     reserved: list[int] | None = None) -> list[int]:
    """A3: `budget` tokens split over chunks in proportion to the question's attention on each, after
    each chunk's `reserved` tokens (its heads): what a chunk's size caps goes to the others, and the
    rounding is settled by the largest shares, so it adds up to the budget while any read chunk has
    room. Chunks the question does not read get nothing beyond their reserve."""
    out = list(reserved or [0] * len(chunk_sizes))
    rest = budget - sum(out)
    active = [c for c, r in enumerate(relevance) if r > 0 and out[c] < chunk_sizes[c]]
    while rest > 0 and active:
        total = sum(relevance[c] for c in active)
        share = {c: rest * relevance[c] / total for c in active}
        given = 0
        for c in active:
            g = min(int(share[c]), chunk_sizes[c] - out[c])
            out[c] += g
            given += g
        if given == 0:  # only fractions left: one token each to the largest shares
            for c in sorted(active, key=lambda c: -share[c])[:rest]:
                out[c] += 1
                given += 1
        rest -= given
        active = [c for c in active if out[c] < chunk_sizes[c]]
    return out


def pick_tokens(scores: torch.Tensor, groups: torch.Tensor, budgets: list[int],
                always: torch.Tensor | None = None, always_rank: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted int64 indices: every token with groups == -1, plus for each group g the budgets[g]
    best of its members. Members in `always` (bool [T]) come first, ordered by always_rank
    (smaller first; e.g. the offset inside the chunk), then the rest by descending score."""
    picked = [torch.nonzero(groups < 0).flatten()]
    for g, budget in enumerate(budgets):
        members = torch.nonzero(groups == g).flatten()
        budget = min(budget, members.numel())
        if budget <= 0:
            continue
        if always is not None and bool(always[members].any()):
            first = members[always[members]]
            if always_rank is not None:
                first = first[torch.argsort(always_rank[first], stable=True)]
            rest = members[~always[members]]
            order = torch.cat([first, rest[torch.argsort(scores[rest], descending=True, stable=True)]])
            picked.append(order[:budget])
        else:
            picked.append(members[torch.topk(scores[members], budget).indices])
    return torch.cat(picked).sort().values
