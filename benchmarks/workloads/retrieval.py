"""Retrieval workload: a fixed system prompt, the top-k documents retrieved for each question in
score order, then the question; documents recur in new combinations and orders.

    SYSTEM_PROMPT, JOINS                                 the shared prefix; the ways parts are joined
    documents(n, min_tokens, max_tokens, seed, tokenizer=None, corpus=None) -> list[str]
    retrieve(rng, log_popularity, k, noise) -> list[int] the top-k documents by score, best first
    generate(n, n_docs, ..., seed, ...) -> list[Request] the trace
    fresh_requests(n, n_docs, ..., seed, ...) -> list[Request]   requests of documents no trace holds
    repeat_share(requests) / first_document_repeat_share(requests)   how much the trace reuses

The corpus is n_docs documents cut one after another from text.py's corpus (the Paul Graham
essays when installed), each of a length drawn uniformly in [min_tokens, max_tokens] (the real
tokenizer's tokens when one is given). Document d has Zipf popularity 1 / (d + 1)**zipf_s. A
question scores every document: log popularity + noise x a standard Gumbel draw of its own; it
retrieves the k best (k uniform in [k_min, k_max]) in score order, best first. With noise 1 that
is a draw without replacement in proportion to popularity (the Gumbel-top-k trick), so popular
documents come back often, in other company and other places. The prompt is SYSTEM_PROMPT, the
documents and "Question <i>: ...", joined by kvplug's chunk separator (" # # ", join="separator")
or by a blank line (join="newlines", for chunking without separators). The system prompt is the
only prefix every request shares; a popular document retrieved first again also repeats the
prefix up to its end (first_document_repeat_share says how often).

Repeat share = occurrences of a document already seen earlier in the trace / all occurrences.
The defaults (200 documents of 256-768 tokens, zipf_s 1.2, noise 1, k 4..8, 48 requests) give
0.72 at seeds 0-2 (test_workloads checks >= 0.6); shorter traces repeat less (16 requests: 0.60,
12: 0.55, 8: 0.45 at seed 0). With SmolLM2's tokenizer a prompt is ~3,330 tokens (at most ~4,740).
"""
from __future__ import annotations

import math
import random

from . import SEPARATOR, Request
from .text import Corpus, Tokenizer, fit_words, load_corpus, question

JOINS = {"separator": SEPARATOR, "newlines": "\n\n"}
ORDERS = ("score", "shuffled")
SYSTEM_PROMPT = (
    "You are a careful research assistant. A search engine has retrieved the documents below for "
    "the user's question, the most relevant first. Answer the question using only what the documents "
    "say. Quote the words of a document when you rely on it, and say which document you used. If the "
    "documents disagree, say so and give both views. If they do not contain the answer, say that you "
    "do not know instead of guessing. Keep the answer short: one or two sentences unless the question "
    "asks for a list. Do not repeat the question, do not mention the search engine, and do not add "
    "facts of your own. Write plain English without markup.")


def documents(n: int, min_tokens: int, max_tokens: int, seed: int, tokenizer: Tokenizer | None = None,
              corpus: Corpus | None = None) -> list[str]:
    """n documents cut one after another from the corpus (wrapping at its end), each of a length
    drawn uniformly in [min_tokens, max_tokens]. The first m of n documents are the m documents
    of the same call with n = m: growing n only appends."""
    if n < 0 or not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"n={n} must be >= 0 and 1 <= min_tokens={min_tokens} <= max_tokens={max_tokens}")
    corpus = corpus or load_corpus()
    words, size = corpus.words, len(corpus.words)
    rng = random.Random(f"retrieval-docs-{seed}")
    pos, out = rng.randrange(size), []
    for _ in range(n):
        tokens = rng.randint(min_tokens, max_tokens)
        window = [words[(pos + j) % size] for j in range(tokens)]  # a word is at least one token
        doc = fit_words(window, tokens, tokenizer)
        out.append(doc)
        pos += len(doc.split())
    return out


def retrieve(rng: random.Random, log_popularity: list[float], k: int, noise: float) -> list[int]:
    """The k documents of highest score log_popularity[d] + noise * Gumbel, best first."""
    if not 0 <= k <= len(log_popularity):
        raise ValueError(f"cannot retrieve {k} documents from a pool of {len(log_popularity)}")
    scores = [(lp + noise * -math.log(-math.log(rng.random() or 1e-300)), d)
              for d, lp in enumerate(log_popularity)]
    return [d for _, d in sorted(scores, reverse=True)[:k]]


def _check(n: int, n_docs: int, k_min: int, k_max: int, zipf_s: float, noise: float, join: str, order: str) -> None:
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if not 1 <= k_min <= k_max:
        raise ValueError(f"k_min={k_min}, k_max={k_max}: need 1 <= k_min <= k_max")
    if k_max > n_docs:
        raise ValueError(f"k_max={k_max} > n_docs={n_docs}: grow the pool or lower k_max")
    if zipf_s < 0 or noise < 0:
        raise ValueError(f"zipf_s={zipf_s} and noise={noise} must be >= 0")
    if join not in JOINS:
        raise ValueError(f"join={join!r}: allowed values are {', '.join(JOINS)}")
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: allowed values are {', '.join(ORDERS)}")


def _prompt(docs: list[str], ids: list[int], q: str, join: str) -> str:
    return JOINS[join].join([SYSTEM_PROMPT, *(docs[d] for d in ids), q])


def generate(n: int = 48, n_docs: int = 200, doc_min_tokens: int = 256, doc_max_tokens: int = 768,
             zipf_s: float = 1.2, k_min: int = 4, k_max: int = 8, noise: float = 1.0, seed: int = 0,
             max_tokens: int = 32, join: str = "separator", order: str = "score",
             tokenizer: Tokenizer | None = None, corpus: Corpus | None = None) -> list[Request]:
    """n requests; request i is session "ret-<i>", round 0. order "shuffled" shuffles each
    request's retrieved documents (a control without score order)."""
    _check(n, n_docs, k_min, k_max, zipf_s, noise, join, order)
    docs = documents(n_docs, doc_min_tokens, doc_max_tokens, seed, tokenizer, corpus)
    log_pop = [-zipf_s * math.log(d + 1) for d in range(n_docs)]
    rng, shuffler = random.Random(f"retrieval-{seed}"), random.Random(f"retrieval-order-{seed}")
    out = []
    for i in range(n):
        ids = retrieve(rng, log_pop, rng.randint(k_min, k_max), noise)
        if order == "shuffled":  # its own generator: the same documents as in score order
            shuffler.shuffle(ids)
        q = f"Question {i + 1}: {question(rng)}"
        out.append(Request(prompt=_prompt(docs, ids, q, join), session=f"ret-{i}", round=0, doc_ids=tuple(ids),
                           max_tokens=max_tokens))
    return out


def fresh_requests(n: int, n_docs: int = 200, doc_min_tokens: int = 256, doc_max_tokens: int = 768,
                   k_min: int = 4, k_max: int = 8, seed: int = 0, max_tokens: int = 32, join: str = "separator",
                   tokenizer: Tokenizer | None = None, corpus: Corpus | None = None) -> list[Request]:
    """n requests made of documents n_docs, n_docs + 1, ... of the same corpus cut (none of them in
    a trace of n_docs documents, none used twice): a pass with nothing to reuse but the system
    prompt. Session "fresh-<i>"; doc_ids are those document numbers."""
    _check(n, n_docs + 1, k_min, k_max, 0.0, 0.0, join, "score")
    rng = random.Random(f"retrieval-fresh-{seed}")
    ks = [rng.randint(k_min, k_max) for _ in range(n)]
    docs = documents(n_docs + sum(ks), doc_min_tokens, doc_max_tokens, seed, tokenizer, corpus)
    out, d = [], n_docs
    for i, k in enumerate(ks):
        ids = list(range(d, d + k))
        d += k
        q = f"Question {i + 1}: {question(rng)}"
        out.append(Request(prompt=_prompt(docs, ids, q, join), session=f"fresh-{i}", round=0, doc_ids=tuple(ids),
                           max_tokens=max_tokens))
    return out


def repeat_share(requests: list[Request]) -> float:
    """Document occurrences whose document appeared earlier in the trace / all occurrences (NaN if none)."""
    seen: set[int] = set()
    repeats = total = 0
    for r in requests:
        for d in r.doc_ids:
            repeats += d in seen
            total += 1
            seen.add(d)
    return repeats / total if total else math.nan


def first_document_repeat_share(requests: list[Request]) -> float:
    """Requests whose first document was the first document of an earlier request / requests:
    the share that repeats a prefix beyond the system prompt (NaN if none)."""
    seen: set[int] = set()
    repeats = 0
    for r in requests:
        if r.doc_ids:
            repeats += r.doc_ids[0] in seen
            seen.add(r.doc_ids[0])
    return repeats / len(requests) if requests else math.nan
