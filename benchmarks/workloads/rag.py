"""RAG workload: queries over a document pool with Zipf popularity, top-k chunks per prompt.

    zipf_weights(n, s) -> list[float]                    popularity of documents 0..n-1
    sample_distinct(rng, weights, k) -> list[int]        k distinct ids drawn by weight
    generate(n, n_docs, chunk_tokens, zipf_s, k_min, k_max, seed, ...) -> list[Request]

Document i has popularity rank i (0 is the most retrieved). A query retrieves k documents,
k uniform in [k_min, k_max], drawn by popularity without replacement, then shuffled: the same
chunk appears at different positions in different prompts, which is what blending serves and
prefix caching cannot. Prompt = chunk texts and the question, joined by SEPARATOR.
"""
from __future__ import annotations

import random
from itertools import accumulate

from . import SEPARATOR, Request
from .text import Tokenizer, load_corpus, make_documents, question


def zipf_weights(n: int, s: float) -> list[float]:
    """Unnormalised Zipf weights 1 / rank**s, rank from 1; s=0 is uniform."""
    if s < 0:
        raise ValueError(f"zipf_s={s}: must be >= 0 (0 = uniform popularity)")
    return [1.0 / (i + 1) ** s for i in range(n)]


def sample_distinct(rng: random.Random, weights: list[float], k: int) -> list[int]:
    """k distinct indices; each draw picks among the remaining ones in proportion to weight."""
    if not 0 <= k <= len(weights):
        raise ValueError(f"cannot draw {k} distinct documents from a pool of {len(weights)}")
    remaining = list(range(len(weights)))
    picked: list[int] = []
    for _ in range(k):
        cum = list(accumulate(weights[i] for i in remaining))
        x = rng.random() * cum[-1]
        j = next((j for j, c in enumerate(cum) if x < c), len(cum) - 1)  # float-edge guard
        picked.append(remaining.pop(j))
    return picked


def _check(n: int, n_docs: int, k_min: int, k_max: int, queries_per_session: int) -> None:
    if n < 0 or queries_per_session < 1:
        raise ValueError(f"n={n} must be >= 0 and queries_per_session={queries_per_session} >= 1")
    if not 1 <= k_min <= k_max:
        raise ValueError(f"k_min={k_min}, k_max={k_max}: need 1 <= k_min <= k_max")
    if k_max > n_docs:
        raise ValueError(f"k_max={k_max} > n_docs={n_docs}: grow the pool or lower k_max")


def generate(n: int = 100, n_docs: int = 50, chunk_tokens: int = 512, zipf_s: float = 1.0,
             k_min: int = 4, k_max: int = 8, seed: int = 0, max_tokens: int = 32,
             queries_per_session: int = 1, tokenizer: Tokenizer | None = None) -> list[Request]:
    """n queries; query i belongs to session i // queries_per_session, round i % that."""
    _check(n, n_docs, k_min, k_max, queries_per_session)
    docs = make_documents(n_docs, chunk_tokens, seed, tokenizer, load_corpus())
    weights = zipf_weights(n_docs, zipf_s)
    rng = random.Random(f"rag-{seed}")
    out = []
    for i in range(n):
        ids = sample_distinct(rng, weights, rng.randint(k_min, k_max))
        rng.shuffle(ids)
        prompt = SEPARATOR.join([*(docs[d] for d in ids), f"Question: {question(rng)}"])
        out.append(Request(prompt=prompt, session=f"rag-{i // queries_per_session}",
                           round=i % queries_per_session, doc_ids=tuple(ids), max_tokens=max_tokens))
    return out
