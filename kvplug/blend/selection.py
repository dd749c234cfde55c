"""Which cached tokens get their KV recomputed (CacheBlend's selection, Cache-Craft's budget).

    fixed_budget(chunk_of, ratio) -> (pooled chunk_of, [budget])   one budget over all cached tokens
    adaptive_budget(chunk_sizes, outside_mass, relevance, ratio) -> [tokens per chunk]
    pick_tokens(scores [n], chunk_of [n], budgets) -> sorted int64 indices

`scores` is the per-token KV deviation at the check layer (kvplug.ops.deviation_topk);
`chunk_of[t]` the chunk of token t, or -1 for tokens that are always recomputed.

The adaptive estimator (Cache-Craft's two signals). A chunk's cached KV was computed in another
context; in the new prompt its tokens attend to whatever precedes the chunk now. (1) The share
of their attention that goes there (`outside_mass`, fresh queries at the check layer) is how
much their KV can have changed: a chunk at position 0 has share 0 and its cached KV is exact,
a chunk whose tokens mostly look at themselves barely changes. (2) The share of the question's
attention that lands on the chunk (`relevance`, the question's queries at the check layer) is
how much an error there can matter to the answer. The request's budget, `ratio` x its cached
tokens (the same as `fixed`), is split over chunks in proportion to (1) x (2), each chunk
capped at its own size; what a cap cuts off is not handed on, so adaptive never recomputes
more than fixed, and less when one chunk draws most of the question's attention.
"""
from __future__ import annotations

import torch


def fixed_budget(chunk_of: torch.Tensor, ratio: float) -> tuple[torch.Tensor, list[int]]:
    """CacheBlend: the top ratio of all cached tokens by deviation, wherever they are."""
    pooled = torch.where(chunk_of >= 0, 0, -1)
    return pooled, [round(ratio * int((chunk_of >= 0).sum()))]


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
    # floor (plus float slack), so the sum never exceeds fixed's round(ratio x tokens)
    return [min(n, int(budget * w / total + 1e-9)) for n, w in zip(chunk_sizes, weights)]


def pick_tokens(scores: torch.Tensor, chunk_of: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Every token with chunk_of == -1, plus the budgets[c] highest-scoring tokens of chunk c."""
    picked = [torch.nonzero(chunk_of < 0).flatten()]
    for c, budget in enumerate(budgets):
        members = torch.nonzero(chunk_of == c).flatten()
        budget = min(budget, members.numel())
        if budget > 0:
            picked.append(members[torch.topk(scores[members], budget).indices])
    return torch.cat(picked).sort().values
