"""Chunking benchmark (benchmarks/chunking.py): its reuse measure on hand-made prompts, no tokenizer."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import chunking as bench  # noqa: E402

from kvplug.core.chunking import chunk_spans  # noqa: E402


def prompt(framing, tokens, places):
    return {"framing": framing, "tokens": tokens, "places": places}


def test_reuse_counts_a_passages_tokens_in_chunks_its_first_prompt_had():
    sep = (0,)
    p1, p2, p3 = [10] * 20, [11] * 30, [12] * 25
    first = prompt("plain", [1] + p1 + [0] + p2 + [0] + p3 + [0, 9], {1: (1, 21), 2: (22, 52), 3: (53, 78)})
    # p2 comes back as the same chunk ([0] + p2); p1 as [0] + p1, where `first` had [1] + p1 (its
    # head chunk); p3 not at all.
    later = prompt("plain", [2, 0] + p2 + [0] + p1 + [0, 9], {2: (2, 32), 1: (33, 53)})
    prompts = [first, later]
    chunks = [bench.cached_chunks(chunk_spans(p["tokens"], sep), p["tokens"], b"n" * 32) for p in prompts]
    per = bench.measure_reuse(prompts, chunks, {"plain": ("plain", ("plain",))})["plain"]
    assert per == {2: (30, 30), 1: (0, 20)}  # [0] + p2 recurs; [0] + p1 is a chunk `first` never had
    assert bench.reuse_pairs(prompts, "plain", ("plain",)) == [(2, 0, 1), (1, 0, 1)]


def test_reused_tokens_clip_chunks_to_the_passage():
    chunks = [(0, 10, b"a"), (10, 40, b"b"), (40, 50, b"c")]
    assert bench.reused_tokens(chunks, {b"b", b"c"}, 5, 45) == 30 + 5
    assert bench.reused_tokens(chunks, set(), 0, 50) == 0


def test_bootstrap_interval_holds_the_pooled_share():
    share, lo, hi = bench.bootstrap({1: (50, 100), 2: (90, 100), 3: (70, 100)})
    assert share == 0.7 and lo <= share <= hi and 0.5 <= lo and hi <= 0.9
