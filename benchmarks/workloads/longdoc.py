"""Long shared documents, many questions each: prompt = document + question.

    generate(n_docs, questions, doc_tokens, seed, order="interleaved", ...) -> list[Request]

Session "doc-<d>" holds document d's questions (round = question index). Order
"interleaved" asks question q of every document before question q+1 (documents rotate, the
case where a small KV cache thrashes and offload helps), "grouped" asks all of one document's
questions first, "shuffled" is a seeded random order.
"""
from __future__ import annotations

import random

from . import Request
from .text import Tokenizer, load_corpus, make_documents, question

ORDERS = ("interleaved", "grouped", "shuffled")


def generate(n_docs: int = 4, questions: int = 8, doc_tokens: int = 4096, seed: int = 0,
             max_tokens: int = 32, order: str = "interleaved",
             tokenizer: Tokenizer | None = None) -> list[Request]:
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: allowed values are {', '.join(ORDERS)}")
    if n_docs < 0 or questions < 0:
        raise ValueError(f"n_docs={n_docs} and questions={questions} must be >= 0")
    docs = make_documents(n_docs, doc_tokens, seed, tokenizer, load_corpus())
    rng = random.Random(f"longdoc-{seed}")
    # Question text is drawn per (doc, q) up front, so the order never changes the prompts.
    asked = [[f"{docs[d]}\n\nQuestion {q + 1}: {question(rng)}\nAnswer:" for q in range(questions)]
             for d in range(n_docs)]
    pairs = [(d, q) for q in range(questions) for d in range(n_docs)]
    if order == "grouped":
        pairs.sort()
    elif order == "shuffled":
        rng.shuffle(pairs)
    return [Request(prompt=asked[d][q], session=f"doc-{d}", round=q, doc_ids=(d,),
                    max_tokens=max_tokens) for d, q in pairs]
