"""SchedulerHalf with chunking "content": a prompt with no separator is cut where its content says,
the chunks vLLM computed are saved under those spans, and a passage that comes back after the same
opening is claimed from the tiers; "chunk_ends" in kv_transfer_params still overrides the chunker."""
import random

from fakes import Request, facts, step_cached, step_new
from kvplug.config import KVPlugConfig
from kvplug.connector.scheduler import SchedulerHalf
from kvplug.core.chunking import chunk_key, content_spans

CDC = {"window": 16, "min_tokens": 32, "target_tokens": 64, "max_tokens": 256}  # the defaults


def half(**extra) -> SchedulerHalf:
    cfg = KVPlugConfig.from_dict({"cpu_bytes": 1e7, "blend": True, "chunking": "content", **extra})
    return SchedulerHalf(cfg, facts(num_blocks=512), separator=(901, 902))


def text(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def prefill(s: SchedulerHalf, req: Request) -> list:
    """One request prefilled in one step; the chunk saves its computed chunks get."""
    blocks = list(range(1, -(-len(req.prompt_token_ids) // 16) + 2))
    n, _ = s.num_matched(req, 0)
    s.after_alloc(req, blocks, n)
    first = s.build_meta(step_new(req, blocks, 0, len(req.prompt_token_ids) - n))
    return first.chunk_saves + s.build_meta(step_cached(req, len(req.prompt_token_ids), 1)).chunk_saves


def test_content_chunks_are_saved_under_their_spans():
    s = half()
    prompt = text(40, 0) + text(600, 1) + text(500, 2) + text(30, 3)  # head, two documents, question
    saves = prefill(s, Request("a", prompt))
    assert [(c.begin, c.end) for c in saves] == content_spans(prompt, **CDC)
    assert all(c.key == chunk_key(facts().namespace, prompt[c.begin:c.end]) for c in saves)


def test_a_document_after_the_same_opening_is_claimed_up_to_where_the_prompts_part():
    s = half()
    head, d1 = text(40, 0), text(600, 1)
    prefill(s, Request("a", head + d1 + text(500, 2) + text(30, 3)))
    b = head + d1 + text(700, 4) + text(30, 5)  # the same opening, then another document
    spans = content_spans(b, **CDC)
    cached = {(x, y) for x, y in content_spans(head + d1 + text(500, 2) + text(30, 3), **CDC)}
    first_new = next(x for x, y in spans if (x, y) not in cached)
    assert first_new <= len(head) + len(d1) < first_new + CDC["max_tokens"]  # the junction chunk
    n, _ = s.num_matched(Request("b", b, kv_transfer_params={"recompute_ratio": 0.3}), 0)
    assert n == first_new and n > 500  # every chunk before it: head and most of d1


def test_chunk_ends_override_content_chunking():
    s = half()
    prompt = text(700, 6)
    saves = prefill(s, Request("a", prompt, kv_transfer_params={"chunk_ends": [100, 350, 650]}))
    assert [(c.begin, c.end) for c in saves] == [(0, 100), (100, 350), (350, 650)]
