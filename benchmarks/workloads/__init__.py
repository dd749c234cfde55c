"""Synthetic serving workloads for kvplug benchmarks: pure Python, deterministic with a seed.

Kinds (each a module with `generate(...) -> list[Request]`, sizes as arguments):
    rag      queries over a document pool, Zipf popularity, top-k chunks joined by SEPARATOR
    chat     multi-round sessions whose prompt grows by the previous answer and a new turn
    longdoc  N long documents x M questions, prompt = document + question
    retrieval a system prompt, the top-k of 200 documents retrieved in score order, the question

    Request(prompt, session, round, doc_ids, max_tokens)   one request, a frozen dataclass
    generate(kind, **kwargs) -> list[Request]              dispatch to the kind's module
    write_jsonl(requests, path) / read_jsonl(path)         one JSON object per request
    write_vllm_custom(requests, path)                      `vllm bench serve --dataset-name custom` JSONL
    main(argv)                                             `python -m benchmarks.workloads --kind rag ...`

Same arguments and seed give identical requests (and byte-identical JSONL) on every machine.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

SEPARATOR = " # # "  # kvplug's default chunk_separator: blending splits prompts here


def file_sha256(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (downloaded data is checked against it)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
KINDS = ("rag", "chat", "longdoc", "retrieval")
FORMATS = ("jsonl", "vllm-custom")


@dataclass(frozen=True)
class Request:
    prompt: str
    session: str  # requests of one session share a growing prefix (chat) or a document (longdoc)
    round: int  # position of the request within its session, from 0
    doc_ids: tuple[int, ...]  # documents in the prompt, in prompt order (empty for chat)
    max_tokens: int

    def to_json(self) -> dict:
        return {**asdict(self), "doc_ids": list(self.doc_ids)}

    @classmethod
    def from_json(cls, obj: dict) -> "Request":
        return cls(prompt=obj["prompt"], session=obj["session"], round=int(obj["round"]),
                   doc_ids=tuple(int(d) for d in obj["doc_ids"]), max_tokens=int(obj["max_tokens"]))


def generate(kind: str, **kwargs) -> list[Request]:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: allowed values are {', '.join(KINDS)}")
    # Relative import at call time: the kind modules import Request from this package.
    module = importlib.import_module(f".{kind}", __name__)
    return module.generate(**kwargs)


def write_jsonl(requests: Iterable[Request], path: str | os.PathLike) -> int:
    """Write one sorted-key JSON line per request; returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(r.to_json(), sort_keys=True, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_vllm_custom(requests: Iterable[Request], path: str | os.PathLike) -> int:
    """Write the requests as vLLM 0.32's custom dataset (vllm/benchmarks/datasets/datasets.py,
    CustomDataset): one {"prompt", "output_tokens"} object per line, in trace order. Replay it
    unchanged with `vllm bench serve --dataset-name custom --dataset-path PATH --skip-chat-template
    --disable-shuffle --ignore-eos` (without the last three it templates, shuffles and stops at EOS)."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"prompt": r.prompt, "output_tokens": r.max_tokens}, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[Request]:
    with open(path, encoding="utf-8") as f:
        return [Request.from_json(json.loads(line)) for line in f if line.strip()]


def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer  # heavy: only when --tokenizer is given

    tok = AutoTokenizer.from_pretrained(path)
    return lambda text: tok.encode(text, add_special_tokens=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workloads", description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=None,
                   help="requests: rag queries (default 100); chat/longdoc: caps the total and sets "
                        "sessions/questions to ceil(n / rounds|docs)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="jsonl: one Request per line; vllm-custom: vllm bench serve's custom dataset")
    p.add_argument("--tokenizer", help="HF tokenizer folder for exact token sizes (default: words)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--docs", type=int, help="rag: pool size (50); longdoc: documents (4); retrieval: corpus (200)")
    p.add_argument("--doc-tokens", type=int, help="rag: chunk tokens (512); longdoc: tokens (4096)")
    p.add_argument("--doc-min-tokens", type=int, default=256, help="retrieval: shortest document")
    p.add_argument("--doc-max-tokens", type=int, default=768, help="retrieval: longest document")
    p.add_argument("--zipf-s", type=float, default=None, help="rag/retrieval: Zipf exponent of popularity (1.0/1.2)")
    p.add_argument("--k-min", type=int, default=4, help="rag/retrieval: fewest documents per query")
    p.add_argument("--k-max", type=int, default=8, help="rag/retrieval: most documents per query")
    p.add_argument("--noise", type=float, default=1.0, help="retrieval: scale of the per-question score noise")
    p.add_argument("--join", default="separator", help="retrieval: separator (kvplug's ' # # ') or newlines")
    p.add_argument("--order", default="score", help="retrieval: score (best first) or shuffled")
    p.add_argument("--queries-per-session", type=int, default=1, help="rag: queries per session")
    p.add_argument("--sessions", type=int, default=8, help="chat: sessions")
    p.add_argument("--rounds", type=int, default=6, help="chat: rounds per session")
    p.add_argument("--turn-tokens", type=int, default=64, help="chat: tokens per user turn")
    p.add_argument("--answer-tokens", type=int, default=96, help="chat: tokens per answer placeholder")
    p.add_argument("--questions", type=int, default=8, help="longdoc: questions per document")
    return p


def _kwargs(a: argparse.Namespace) -> dict:
    common = {"seed": a.seed, "max_tokens": a.max_tokens}
    if a.tokenizer:
        common["tokenizer"] = _hf_tokenizer(a.tokenizer)
    if a.kind == "retrieval":
        return {**common, "n": 48 if a.n is None else a.n, "n_docs": a.docs or 200,
                "doc_min_tokens": a.doc_min_tokens, "doc_max_tokens": a.doc_max_tokens,
                "zipf_s": 1.2 if a.zipf_s is None else a.zipf_s, "k_min": a.k_min, "k_max": a.k_max,
                "noise": a.noise, "join": a.join, "order": a.order}
    if a.kind == "rag":
        return {**common, "n": 100 if a.n is None else a.n, "n_docs": a.docs or 50,
                "chunk_tokens": a.doc_tokens or 512, "zipf_s": 1.0 if a.zipf_s is None else a.zipf_s, "k_min": a.k_min,
                "k_max": a.k_max, "queries_per_session": a.queries_per_session}
    if a.kind == "chat":
        sessions = a.sessions if a.n is None else math.ceil(a.n / a.rounds)
        return {**common, "n_sessions": sessions, "rounds": a.rounds,
                "turn_tokens": a.turn_tokens, "answer_tokens": a.answer_tokens}
    docs = a.docs or 4
    questions = a.questions if a.n is None else math.ceil(a.n / docs)
    return {**common, "n_docs": docs, "questions": questions, "doc_tokens": a.doc_tokens or 4096}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        requests = generate(a.kind, **_kwargs(a))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.n is not None:
        requests = requests[:a.n]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    n = (write_vllm_custom if a.format == "vllm-custom" else write_jsonl)(requests, a.out)
    sessions = len({r.session for r in requests})
    extra = ""
    if a.kind == "retrieval":
        from .retrieval import first_document_repeat_share, repeat_share
        extra = (f"; repeat share of document occurrences {repeat_share(requests):.3f}, "
                 f"first document repeated {first_document_repeat_share(requests):.3f}")
    print(f"wrote {n} {a.kind} requests ({sessions} sessions) to {a.out} ({a.format}){extra}")
    return 0
