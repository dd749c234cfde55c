"""Which cached tokens get their KV recomputed (CacheBlend's selection, Cache-Craft's budget).

    fixed_budget(chunk_of, ratio) -> (pooled chunk_of, [budget])   one budget over all cached tokens
    adaptive_budget(chunk_sizes, outside_mass, ratio) -> [tokens per chunk]
    pick_tokens(scores [n], chunk_of [n], budgets) -> sorted int64 indices

`scores` is the per-token KV deviation at the check layer (kvplug.ops.deviation_topk);
`chunk_of[t]` the chunk of token t, or -1 for tokens that are always recomputed.

The adaptive estimator. A chunk's cached KV was computed with nothing before it; in the new
prompt its tokens also attend to everything that precedes the chunk. The share of their
attention that goes there (`outside_mass`, measured on the fresh queries of the check layer)
is how much their KV can have changed: a chunk at position 0 has share 0 and its cached KV
is exact; a chunk whose tokens mostly look at themselves barely changes. Cache-Craft calls
this the chunk's inter-chunk attention and fixes a fraction of the chunk proportional to it.
Here the most context-dependent chunk of the request gets the full `ratio`, and every other
chunk `ratio * its share / the largest share`: never more tokens than `fixed`, fewer where
chunks are self-contained.
"""
from __future__ import annotations

import torch


def fixed_budget(chunk_of: torch.Tensor, ratio: float) -> tuple[torch.Tensor, list[int]]:
    """CacheBlend: the top ratio of all cached tokens by deviation, wherever they are."""
    pooled = torch.where(chunk_of >= 0, 0, -1)
    return pooled, [round(ratio * int((chunk_of >= 0).sum()))]


def adaptive_budget(chunk_sizes: list[int], outside_mass: list[float], ratio: float) -> list[int]:
    if len(chunk_sizes) != len(outside_mass):
        raise ValueError(f"{len(chunk_sizes)} chunks but {len(outside_mass)} attention shares")
    top = max(outside_mass, default=0.0)
    if top <= 0:
        return [0] * len(chunk_sizes)
    return [round(ratio * n * max(m, 0.0) / top) for n, m in zip(chunk_sizes, outside_mass)]


def pick_tokens(scores: torch.Tensor, chunk_of: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Every token with chunk_of == -1, plus the budgets[c] highest-scoring tokens of chunk c."""
    picked = [torch.nonzero(chunk_of < 0).flatten()]
    for c, budget in enumerate(budgets):
        members = torch.nonzero(chunk_of == c).flatten()
        budget = min(budget, members.numel())
        if budget > 0:
            picked.append(members[torch.topk(scores[members], budget).indices])
    return torch.cat(picked).sort().values
