"""The serve benchmark's request traces, sized with the model's tokenizer (no server here).

    rag_session_trace(n, n_contexts, ...) -> list[Request]   "rag_sessions": Zipf draws over fixed contexts
    unique_context_tokens(trace, count) / warm_up_prompts(trace)   its working set; its oracle's warm-up
    build_trace(args, tok) -> (trace, info)                  the rag_sessions trace of a run
    build_retrieval(args, tok) -> (trace, fresh, info)       "retrieval" (workloads/retrieval.py), its fresh pass
    unique_prefix_tokens(prompts_ids) / chunk_tokens(...)     the retrieval trace's working sets
    document_warm_prompts(trace, join, lead)                 every document once, as a chunk (the oracles)
    export_custom(folder, traces) -> {name: path}            both traces as vllm bench serve custom datasets

The rag_sessions trace draws whole retrieved contexts (Zipf over C fixed document lists), so its
reuse is mostly exact prefixes; the retrieval trace retrieves documents per question, so its
reuse is the same documents in new combinations and orders after a shared system prompt.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import SEPARATOR, Request, write_vllm_custom  # noqa: E402
from workloads import rag, retrieval  # noqa: E402
from workloads.text import question  # noqa: E402

WORKLOAD = "rag_sessions"
RETRIEVAL = "retrieval"
WARM_QUESTION = "Question 0: warm-up."


# ---------------------------------------------------------------- rag_sessions
def rag_session_trace(n: int, n_contexts: int, n_docs: int, chunk_tokens: int, k_min: int, k_max: int,
                      zipf_docs: float, zipf_contexts: float, seed: int, max_tokens: int,
                      tokenizer=None) -> list[Request]:
    """n requests over n_contexts retrieved sets made by the RAG generator; each request draws
    its context by Zipf(zipf_contexts) and asks a new numbered question after it."""
    base = rag.generate(n=n_contexts, n_docs=n_docs, chunk_tokens=chunk_tokens, zipf_s=zipf_docs,
                        k_min=k_min, k_max=k_max, seed=seed, max_tokens=max_tokens, tokenizer=tokenizer)
    contexts = [r.prompt.rsplit(SEPARATOR, 1)[0] for r in base]
    weights = rag.zipf_weights(n_contexts, zipf_contexts)
    rng = random.Random(f"serve-{seed}")
    rounds = [0] * n_contexts
    out = []
    for _ in range(n):
        c = rng.choices(range(n_contexts), weights=weights)[0]
        prompt = f"{contexts[c]}{SEPARATOR}Question {rounds[c] + 1}: {question(rng)}"
        out.append(Request(prompt=prompt, session=f"ctx-{c}", round=rounds[c],
                           doc_ids=base[c].doc_ids, max_tokens=max_tokens))
        rounds[c] += 1
    return out


def unique_context_tokens(trace: list[Request], count_tokens: Callable[[str], int]) -> int:
    """Tokens of the distinct retrieved contexts in the trace (its prefix-cache working set)."""
    seen = {}
    for r in trace:
        seen.setdefault(r.session, r.prompt.rsplit(SEPARATOR, 1)[0])
    return sum(count_tokens(c) for c in seen.values())


def warm_up_prompts(trace: list[Request]) -> list[str]:
    """One prompt per distinct context, in order of first use: the context and a question no
    request asks, so the timed requests reuse exactly what a repeat sighting reuses (the
    context's full blocks) and still compute their own question."""
    seen: dict[str, str] = {}
    for r in trace:
        seen.setdefault(r.session, r.prompt.rsplit(SEPARATOR, 1)[0])
    return [f"{ctx}{SEPARATOR}{WARM_QUESTION}" for ctx in seen.values()]


def build_trace(args, tok) -> tuple[list[Request], dict]:
    count = lambda s: len(tok.encode(s, add_special_tokens=False))  # noqa: E731
    trace = rag_session_trace(args.requests, args.contexts, args.docs, args.doc_tokens, args.k_min,
                              args.k_max, args.zipf_docs, args.zipf_contexts, args.seed, args.max_tokens,
                              tokenizer=lambda s: tok.encode(s, add_special_tokens=False))
    ws_tok = unique_context_tokens(trace, count)
    ev_tok = unique_context_tokens(trace[:args.evict_requests], count)
    prompt_tok = [count(r.prompt) for r in trace]
    sessions = [r.session for r in trace]
    info = {"name": WORKLOAD, "generator": "benchmarks/workloads/rag.py contexts + Zipf context draws",
            "requests": len(trace), "eviction_requests": args.evict_requests, "contexts": args.contexts,
            "distinct_contexts_used": len(set(sessions)),
            "distinct_contexts_eviction": len(set(sessions[:args.evict_requests])),
            "doc_pool": args.docs, "doc_tokens": args.doc_tokens, "k_min": args.k_min, "k_max": args.k_max,
            "zipf_docs": args.zipf_docs, "zipf_contexts": args.zipf_contexts, "seed": args.seed,
            "max_tokens": args.max_tokens, "ignore_eos": True, "concurrency": args.concurrency,
            "prompt_tokens_mean": sum(prompt_tok) / len(prompt_tok), "prompt_tokens_max": max(prompt_tok),
            "working_set_tokens": ws_tok, "eviction_working_set_tokens": ev_tok,
            "repeat_share": retrieval.repeat_share(trace),
            "context_of_request": sessions}
    return trace, info


# ---------------------------------------------------------------- retrieval
def document_warm_prompts(trace: list[Request], join: str, lead: str | None) -> list[str]:
    """Every document of the trace once, in order of first use, as the chunk a request holds it
    as: after `lead` (the retrieval trace's system prompt; its documents never come first), or,
    with lead None, in both forms a rag_sessions prompt can hold it (first, and after a
    separator: `DOC SEP DOC SEP question`, what `kvplug warm --blend` sends). A document's text
    is the prompt's part at its place in doc_ids."""
    sep, docs = retrieval.JOINS[join], {}
    for r in trace:
        parts = r.prompt.split(sep)
        texts = parts[1:-1] if lead is not None else parts[:-1]
        if len(texts) != len(r.doc_ids):
            raise ValueError(f"request {r.session}: {len(texts)} parts for {len(r.doc_ids)} documents")
        for d, text in zip(r.doc_ids, texts):
            docs.setdefault(d, text)
    first = (lambda t: lead) if lead is not None else (lambda t: t)  # noqa: E731
    return [sep.join([first(t), t, WARM_QUESTION]) for t in docs.values()]


def unique_prefix_tokens(prompts_ids: list[list[int]]) -> int:
    """Tokens of the prompts not shared as a prefix with an earlier prompt: the prefix blocks a
    cache that keeps everything stores for the trace (to within a block per prompt)."""
    total = 0
    for i, ids in enumerate(prompts_ids):
        common = 0
        for prev in prompts_ids[:i]:
            n = 0
            for a, b in zip(ids, prev):
                if a != b:
                    break
                n += 1
            common = max(common, n)
        total += len(ids) - common
    return total


def build_retrieval(args, tok) -> tuple[list[Request], list[Request], dict]:
    """(trace, fresh pass, info): the retrieval trace of --ret-* sizes, and --fresh-requests
    requests of documents the trace never holds."""
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    kw = dict(n_docs=args.ret_docs, doc_min_tokens=args.ret_doc_min_tokens, doc_max_tokens=args.ret_doc_max_tokens,
              k_min=args.ret_k_min, k_max=args.ret_k_max, seed=args.seed, max_tokens=args.max_tokens,
              join=args.ret_join, tokenizer=encode)
    trace = retrieval.generate(n=args.ret_requests, zipf_s=args.ret_zipf, noise=args.ret_noise,
                               order=args.ret_order, **kw)
    fresh = retrieval.fresh_requests(args.fresh_requests, **kw) if args.fresh_requests else []
    ids = [encode(r.prompt) for r in trace]
    docs = {d: t for r in trace for d, t in zip(r.doc_ids, r.prompt.split(retrieval.JOINS[args.ret_join])[1:-1])}
    chunk_tok = sum(len(encode(retrieval.JOINS[args.ret_join] + t)) for t in docs.values())
    prompt_tok = [len(x) for x in ids]
    info = {"name": RETRIEVAL, "generator": "benchmarks/workloads/retrieval.py", "requests": len(trace),
            "doc_pool": args.ret_docs, "doc_min_tokens": args.ret_doc_min_tokens,
            "doc_max_tokens": args.ret_doc_max_tokens, "k_min": args.ret_k_min, "k_max": args.ret_k_max,
            "zipf_docs": args.ret_zipf, "noise": args.ret_noise, "join": args.ret_join, "order": args.ret_order,
            "seed": args.seed, "max_tokens": args.max_tokens, "ignore_eos": True, "concurrency": args.concurrency,
            "system_prompt_tokens": len(encode(retrieval.SYSTEM_PROMPT)),
            "prompt_tokens_mean": sum(prompt_tok) / len(prompt_tok), "prompt_tokens_max": max(prompt_tok),
            "repeat_share": retrieval.repeat_share(trace),
            "first_document_repeat_share": retrieval.first_document_repeat_share(trace),
            "distinct_documents": len(docs), "document_occurrences": sum(len(r.doc_ids) for r in trace),
            "prefix_working_set_tokens": unique_prefix_tokens(ids), "chunk_working_set_tokens": chunk_tok,
            "fresh_requests": len(fresh),
            "fresh_prompt_tokens_mean": (sum(len(encode(r.prompt)) for r in fresh) / len(fresh)) if fresh else None,
            "documents_of_request": [list(r.doc_ids) for r in trace]}
    return trace, fresh, info


def export_custom(folder: Path, traces: dict[str, list[Request]]) -> dict[str, str]:
    """Each trace as `<folder>/<name>.jsonl` in vllm bench serve's custom-dataset format."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, trace in traces.items():
        path = folder / f"{name}.jsonl"
        write_vllm_custom(trace, path)
        out[name] = str(path)
    return out
