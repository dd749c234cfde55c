"""End to end over `vllm serve` and the OpenAI client: chat requests whose documents are joined by
blank lines, with no separator anywhere, blend cached chunks with `chunking: "content"`.

The oracle is vLLM alone (float32, greedy, the same chat template): at recompute_ratio 1.0 every
blended token is recomputed, so the outputs must be the same tokens with the same logprobs.
kvplug's Prometheus counters say how many chunks came from the tiers. The scheduler claims chunks
up to the first one no tier holds (where two documents meet in a new order, a chunk that never
repeats), so the request below that keeps the first document and reorders the rest blends the
first document's chunks past vLLM's prefix-cache hit, and the one that reorders all blends none
yet; the expected claim is worked out here from kvplug's chunker and the rule above.
"""
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_offload_e2e import model, served_counter, vllm_serve  # noqa: E402,F401
from tiny_model import CHAT_TEMPLATE, training_corpus  # noqa: E402

from kvplug.core.chunking import content_spans  # noqa: E402

pytestmark = pytest.mark.e2e
BLOCK = 128  # vLLM's CPU block size
CDC = {"window": 16, "min_tokens": 32, "target_tokens": 64, "max_tokens": 256}  # the engine's defaults
# The cost gate off: blend every cached chunk (past the junction chunks no tier holds) at ratio 1.0.
EXTRA = {"cpu_bytes": 1e8, "blend": True, "chunking": "content", "recompute_ratio": 1.0, "blend_cost_gate": False}
SYSTEM = "Answer the question from the documents."
COUNTERS = ("blend_chunk_hits", "blend_tokens", "blend_chunk_misses", "saved_chunks", "blend_requests",
            "blend_chunks_after_miss", "blend_tokens_after_miss")


def document(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    corpus = training_corpus()
    return " ".join(f"{rng.choice(corpus)} [{seed}.{i}]" for i in range(lines))


def messages(docs: list[str], question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "\n\n".join([*docs, f"Question: {question}"])}]


def render(tok, msgs: list[dict]) -> list[int]:
    """The prompt's token ids, as vLLM's chat endpoint makes them."""
    return tok(tok.apply_chat_template(msgs, chat_template=CHAT_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True)).input_ids


def expected_claim(tok, first: list[dict], later: list[dict]) -> tuple[int, list[tuple[int, int]]]:
    """(where the blend span starts: the full blocks `later` shares with `first`, which vLLM's
    prefix cache holds; the chunks claimed from there: every cached one before the prompt's last
    token - the chunks between them, where documents meet, are recomputed inside the span)."""
    a, b = render(tok, first), render(tok, later)
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    start = min(common // BLOCK, (len(b) - 1) // BLOCK) * BLOCK
    cached = {tuple(a[x:y]) for x, y in content_spans(a, **CDC)}
    claimed = []
    for x, y in content_spans(b, **CDC):
        if y <= start:
            continue
        if tuple(b[x:y]) in cached and y <= len(b) - 1:
            claimed.append((x, y))
    return start, claimed


@pytest.fixture(scope="module")
def chats(model):
    """First: documents 1-4. Reordered: document 1 first again, then 3, 2, 4. Shuffled: 3, 1, 4, 2.
    Document 1's length is picked so that a cached chunk lies past the block boundary where
    vLLM's prefix-cache hit ends, before the chunk where documents 1 and 3 meet."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rest = [document(s, 7) for s in (2, 3, 4)]
    best = None
    for lines in range(6, 16):  # the length that blends the most tokens
        d1 = document(1, lines)
        first = messages([d1, *rest], "what does document 2 say?")
        reordered = messages([d1, rest[1], rest[0], rest[2]], "what does document 3 say?")
        start, claimed = expected_claim(tok, first, reordered)
        if claimed and (best is None or claimed[-1][1] - start > best["claimed"][-1][1] - best["start"]):
            shuffled = messages([rest[1], d1, rest[2], rest[0]], "what does document 1 say?")
            best = {"first": first, "reordered": reordered, "shuffled": shuffled, "start": start, "claimed": claimed}
    assert best is not None, "no document length puts a cached chunk past the prefix-cache hit"
    best["chunk_tokens"] = {n: sum(y - x for x, y in content_spans(render(tok, best[n]), **CDC))
                            for n in ("first", "reordered", "shuffled")}
    return best


def chat(url: str, model: str, msgs: list[dict]) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    resp = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=3)
    out = resp.choices[0]
    return {"text": out.message.content, "tokens": [p.token for p in out.logprobs.content],
            "logprobs": [p.logprob for p in out.logprobs.content]}


def wait_counter(url: str, name: str, above: float, timeout: float = 30) -> float:
    """The counter once it exceeds `above` (stats reach /metrics a little after the request)."""
    deadline = time.time() + timeout
    while (value := served_counter(url, name)) <= above and time.time() < deadline:
        time.sleep(0.5)
    return value


def test_chat_documents_joined_by_blank_lines_blend_in_a_new_order(model, chats, tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATE)
    names = ("first", "reordered", "shuffled")
    with vllm_serve(model, tmp_path / "alone.log", None, "--chat-template", str(template)) as url:
        want = {n: chat(url, model, chats[n]) for n in names}
    kv = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both", "kv_connector_extra_config": EXTRA}
    got, counters = {}, {}
    with vllm_serve(model, tmp_path / "kvplug.log", kv, "--chat-template", str(template)) as url:
        for n, wait_for in zip(names, ("saved_chunks", "blend_requests", "blend_chunk_misses")):
            before = {k: served_counter(url, k) for k in COUNTERS}
            got[n] = chat(url, model, chats[n])
            wait_counter(url, wait_for, before[wait_for])
            time.sleep(1)  # the rest of the step's counters
            counters[n] = {k: served_counter(url, k) - v for k, v in before.items()}
    for n in names:  # the share of each prompt's chunk tokens blended, and cached past the first miss
        c = counters[n]
        print(n, {k: int(v) for k, v in c.items()}, f"chunk tokens {chats['chunk_tokens'][n]}",
              f"blended {c['blend_tokens'] / chats['chunk_tokens'][n]:.1%}",
              f"cached after a miss {c['blend_tokens_after_miss'] / chats['chunk_tokens'][n]:.1%}")
    for n in names:
        assert got[n]["tokens"] == want[n]["tokens"], n
        assert all(abs(x - y) < 1e-3 for x, y in zip(got[n]["logprobs"], want[n]["logprobs"])), n
    assert counters["first"]["saved_chunks"] > 0 and counters["first"]["blend_chunk_hits"] == 0
    c = counters["reordered"]
    assert c["blend_requests"] == 1 and c["blend_chunk_hits"] == len(chats["claimed"]) > 0
    assert c["blend_tokens"] == chats["claimed"][-1][1] - chats["start"]
    assert counters["shuffled"]["blend_chunk_hits"] > 0  # documents in a new order, none of it a prefix
