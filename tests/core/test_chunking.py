"""Chunk boundaries (separator and explicit ends) and position-independent chunk keys."""
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplug.core.chunking import chunk_key, chunk_spans, content_spans, separator_ids, spans_from_ends
from kvplug.core.hashing import namespace_digest, prefix_block_keys

NS = namespace_digest(model="m", dtype="bfloat16", block_size=4)
S = (7, 8)  # a two-token separator


# ---- separator_ids -----------------------------------------------------------------------------

VOCAB = {907: "#", 216: " ", 278: " b", 11: "\n", 12: "\t ", 5: "a"}


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


@pytest.mark.parametrize("ids, want", [
    ([907, 907, 216], (907, 907)),          # SmolLM2's " # # " alone: trailing space dropped
    ([216, 907, 216, 907, 216], (907, 216, 907)),  # inner whitespace is kept
    ([11, 12, 5, 11], (5,)),
    ([907], (907,)),
])
def test_separator_ids_strips_whitespace_ends(ids, want):
    assert separator_ids(ids, decode) == want


@pytest.mark.parametrize("ids", [[], [216], [216, 11, 12]])
def test_separator_ids_of_whitespace_only_is_an_error(ids):
    with pytest.raises(ValueError, match="whitespace"):
        separator_ids(ids, decode)


# ---- chunk_spans -------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, sep, want", [
    # a b | S c d | S q  -> two chunks, "S q" is the question
    ([1, 2, 7, 8, 3, 4, 7, 8, 9], S, [(0, 2), (2, 6)]),
    # separator at the start: the empty segment 0 is skipped
    ([7, 8, 1, 2, 7, 8, 9], S, [(0, 4)]),
    # adjacent separators: a chunk that is only the separator
    ([1, 7, 8, 7, 8, 9], S, [(0, 1), (1, 3)]),
    # no separator: no chunks (the whole prompt is the question)
    ([1, 2, 3], S, []),
    ([], S, []),
    # separator at the very end: the tail is the separator alone
    ([1, 2, 7, 8], S, [(0, 2)]),
    # only one separator, at 0: nothing before it
    ([7, 8, 1], S, []),
    # a partial separator at the end is not an occurrence
    ([1, 7, 8, 2, 7], S, [(0, 1)]),
    # overlapping pattern: (1,1) in [1,1,1] matches at 0 only, then [1] is too short
    ([1, 1, 1], (1, 1), []),
    # (1,1) in [1,1,1,1,2]: matches at 0 and 2 (non-overlapping, left to right)
    ([1, 1, 1, 1, 2], (1, 1), [(0, 2)]),
    ([2, 1, 1, 1, 1, 1, 3], (1, 1), [(0, 1), (1, 3)]),
    # one-token separator
    ([5, 0, 6, 0, 0, 7], (0,), [(0, 1), (1, 3), (3, 4)]),
])
def test_chunk_spans_hand_worked(tokens, sep, want):
    assert chunk_spans(tokens, sep) == want


def test_chunk_spans_accepts_tuples_and_rejects_empty_sep():
    assert chunk_spans((1, 7, 8, 2, 7, 8), list(S)) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError, match="sep"):
        chunk_spans([1, 2], ())


def _occurrences_by_brute_force(tokens, sep):
    out, i = [], 0
    while i + len(sep) <= len(tokens):
        if tuple(tokens[i:i + len(sep)]) == sep:
            out.append(i)
            i += len(sep)
        else:
            i += 1
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=60), st.lists(st.integers(0, 3), min_size=1, max_size=3))
def test_chunk_spans_properties(tokens, sep):
    sep = tuple(sep)
    spans = chunk_spans(tokens, sep)
    occ = _occurrences_by_brute_force(tokens, sep)
    # The spans tile [0, start of the last occurrence) exactly, with no empty span.
    end = occ[-1] if occ else 0
    assert [s for s, _ in spans[1:]] == [e for _, e in spans[:-1]]
    assert (spans[0][0] if spans else 0) == 0 and (spans[-1][1] if spans else 0) == end
    assert all(e > s for s, e in spans)
    # Every span after the first starts with the separator, and the spans start exactly at 0 and at
    # each occurrence but the last (a left-to-right, non-overlapping scan).
    for s, e in spans[1:]:
        assert tuple(tokens[s:s + len(sep)]) == sep and e - s >= len(sep)
    assert [s for s, _ in spans] == (sorted({0, *occ[:-1]}) if end > 0 else [])


# ---- spans_from_ends ---------------------------------------------------------------------------

def test_spans_from_ends():
    assert spans_from_ends([3, 5, 9], 12) == [(0, 3), (3, 5), (5, 9)]
    assert spans_from_ends([12], 12) == [(0, 12)]
    assert spans_from_ends((1, 2), 2) == [(0, 1), (1, 2)]
    assert spans_from_ends([], 0) == []


@pytest.mark.parametrize("ends, n, match", [
    ("3,5", 10, "must be a list"),
    ({3: 5}, 10, "must be a list"),
    (None, 10, "must be a list"),
    ([3, True], 10, r"ends\[1\]=True: must be an int"),
    ([3.0], 10, r"ends\[0\]=3.0: must be an int"),
    (["3"], 10, r"ends\[0\]='3'"),
    ([0, 3], 10, r"ends\[0\]=0: must be > 0"),
    ([-1], 10, r"ends\[0\]=-1"),
    ([3, 3], 10, r"ends\[1\]=3: must be > 3 \(strictly increasing"),
    ([5, 3], 10, r"ends\[1\]=3"),
    ([3, 11], 10, r"ends\[1\]=11.*<= the prompt length 10"),
    ([1], -1, "prompt_len=-1"),
    ([1], True, "prompt_len=True"),
])
def test_spans_from_ends_rejects_bad_input(ends, n, match):
    with pytest.raises(ValueError, match=match):
        spans_from_ends(ends, n)


# ---- chunk_key ---------------------------------------------------------------------------------

def test_chunk_key_depends_only_on_the_chunks_own_tokens():
    chunk = [7, 8, 101, 102, 103]
    a = [1, 2, 3] + chunk + [7, 8, 9]
    b = [4] * 50 + chunk
    ka = chunk_key(NS, a[3:8])
    assert len(ka) == 32 and ka == chunk_key(NS, b[50:]) == chunk_key(NS, tuple(chunk))
    assert chunk_key(NS, chunk[:-1]) != ka and chunk_key(NS, chunk + [0]) != ka
    assert chunk_key(NS, [102, 101, 7, 8, 103]) != ka  # order matters


def test_chunk_key_salt_and_namespace_separate_keys():
    toks = list(range(16))
    keys = {
        chunk_key(NS, toks),
        chunk_key(NS, toks, "tenant-a"),
        chunk_key(NS, toks, "tenant-b"),
        chunk_key(namespace_digest(model="m2", dtype="bfloat16", block_size=4), toks),
        chunk_key(namespace_digest(model="m", dtype="float16", block_size=4), toks),
    }
    assert len(keys) == 5
    assert chunk_key(NS, toks, "") == chunk_key(NS, toks, None)
    # Never equal to a prefix block key of the same tokens (domain tag).
    assert chunk_key(NS, toks[:4]) != prefix_block_keys(NS, toks[:4], 4)[0]


def test_chunk_key_is_the_documented_digest():
    # A golden construction: keys name files on disk, so they must never change silently.
    from array import array
    want = hashlib.sha256(b"kvplug-chunk\0" + (32).to_bytes(4, "little") + NS
                          + b"salt\0" + (1).to_bytes(4, "little") + b"t"
                          + array("q", [1, 2, 3]).tobytes()).digest()
    assert chunk_key(NS, [1, 2, 3], "t") == want


@pytest.mark.parametrize("tokens", [[1, 2 ** 63], [-(2 ** 63) - 1], [1.5], ["a"], [None]])
def test_chunk_key_rejects_bad_token_ids(tokens):
    with pytest.raises(ValueError, match="int64"):
        chunk_key(NS, tokens)


def test_chunk_key_rejects_non_bytes_namespace():
    with pytest.raises(ValueError, match="namespace"):
        chunk_key("ns", [1])


# ---- content_spans -----------------------------------------------------------------------------

CDC = {"window": 16, "min_tokens": 32, "target_tokens": 64, "max_tokens": 256}  # the engine defaults
_GEAR_STREAM = hashlib.shake_128(b"kvplug-gear-v1").digest(8 * 65536)


def _gear(t: int) -> int:
    slot = t if 0 <= t < 65536 else (t ^ (t >> 16) ^ (t >> 32) ^ (t >> 48)) & 0xFFFF
    return int.from_bytes(_GEAR_STREAM[8 * slot:8 * slot + 8], "little")


def content_spans_by_definition(tokens, window, min_tokens, target_tokens, max_tokens):
    """The docstring's rule, written the slow way: every position's window hash from scratch, then
    candidates taken one at a time, with forced cuts in between."""
    n, threshold = len(tokens), (1 << window) // (target_tokens - min_tokens + 1)

    def window_hash(i):  # a cut before token i looks at tokens [i - window, i)
        return sum(_gear(tokens[i - 1 - j]) << j for j in range(min(window, i))) % (1 << window)

    cuts, last = [], 0
    for c in (i for i in range(1, n) if window_hash(i) < threshold):
        while c - last > max_tokens:
            last += max_tokens
            cuts.append(last)
        if c - last >= min_tokens:
            cuts.append(c)
            last = c
    while n - last > max_tokens:
        last += max_tokens
        cuts.append(last)
    bounds = [0, *cuts]
    return list(zip(bounds, bounds[1:]))


def random_tokens(n, seed, vocab=49152):
    import random

    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


params_strategy = st.tuples(st.integers(1, 10), st.integers(1, 6), st.integers(1, 12), st.integers(0, 20)).filter(
    lambda p: p[2] < 1 << p[0]).map(lambda p: {"window": p[0], "min_tokens": p[1], "target_tokens": p[1] + p[2],
                                               "max_tokens": p[1] + p[2] + p[3]})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5) | st.integers(0, 2 ** 20) | st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=300),
       params_strategy)
def test_content_spans_follow_their_definition(tokens, params):
    spans = content_spans(tokens, **params)
    assert spans == content_spans_by_definition(tokens, **params)
    # The spans tile [0, last cut) with min..max tokens each; the question keeps >= 1 token.
    assert [b for b, _ in spans] == [0, *(e for _, e in spans)][:len(spans)]
    assert all(params["min_tokens"] <= e - b <= params["max_tokens"] for b, e in spans)
    assert not spans or spans[-1][1] < len(tokens)


def test_content_spans_of_real_lengths_follow_their_definition():
    toks = random_tokens(3000, 1)
    spans = content_spans(toks, **CDC)
    assert spans == content_spans_by_definition(toks, **CDC)
    assert 3000 / 64 * 0.7 < len(spans) < 3000 / 64 * 1.3  # about one chunk per target_tokens


def test_content_spans_are_pinned():
    """Cut points decide chunk keys, which name units on disk and in shared stores: a change to the
    gear table, the hash or the cut rule must be deliberate (and drops every cached chunk)."""
    spans = content_spans(list(range(1000)), **CDC)
    assert spans == [(0, 85), (85, 172), (172, 204), (204, 290), (290, 435), (435, 542), (542, 639), (639, 735),
                     (735, 882), (882, 950)]


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 40])
def test_content_spans_of_short_prompts(n):
    toks = random_tokens(n, 2)
    spans = content_spans(toks, **CDC)
    assert spans == content_spans_by_definition(toks, **CDC)
    assert spans in ([], [(0, 32)]) if n == 33 else spans == [] if n <= 32 else True  # 32 + 1 for the question


def test_content_spans_of_a_prompt_without_candidates_are_forced_at_max():
    # One token repeated: every window hashes alike, so either every position is a candidate or none.
    for tok in range(50):
        spans = content_spans([tok] * 1000, **CDC)
        lengths = {e - b for b, e in spans}
        assert lengths in ({CDC["max_tokens"]}, {CDC["min_tokens"]}), (tok, lengths)
        assert spans[-1][1] < 1000 and 1000 - spans[-1][1] <= CDC["max_tokens"]


def test_content_spans_of_a_200k_token_prompt():
    toks = random_tokens(200_000, 3)
    spans = content_spans(toks, **CDC)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(32 <= e - b <= 256 for b, e in spans) and 0 < 200_000 - spans[-1][1] <= 256
    # The start matches the definition (checked on a prefix: the rule is causal).
    head = content_spans_by_definition(toks[:2000], **CDC)
    assert spans[:len(head) - 1] == head[:-1]


@pytest.mark.parametrize("tokens", [[1.5] * 40, ["a"] * 40, [None] * 40, [2 ** 64] * 40, [[1]] * 40, [True] * 40])
def test_content_spans_reject_bad_token_ids(tokens):
    with pytest.raises(ValueError, match="int64"):
        content_spans(tokens, **CDC)


@pytest.mark.parametrize("params, match", [
    ({**CDC, "window": 0}, "window=0"), ({**CDC, "window": 65}, "window=65"),
    ({**CDC, "min_tokens": 0}, "need 1 <= min < target <= max"),
    ({**CDC, "target_tokens": 32}, "need 1 <= min < target <= max"),
    ({**CDC, "max_tokens": 63}, "need 1 <= min < target <= max"),
    ({**CDC, "window": 4}, "a 4-token window allows at most 15"),
])
def test_content_spans_reject_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        content_spans(list(range(100)), **params)


def _cuts_in(spans, lo, hi):
    """Cut positions inside [lo, hi], relative to lo."""
    return [e - lo for _, e in spans if lo <= e <= hi]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10 ** 6), st.integers(0, 300), st.integers(0, 300), st.integers(1, 300))
def test_a_passage_cuts_the_same_way_in_any_prompt_once_one_cut_agrees(seed, pre_a, pre_b, post):
    """Cuts after a passage's first `window` tokens depend only on its tokens and the previous cut,
    so from the first cut both prompts share (past the window) to the passage's end they agree."""
    passage = random_tokens(1500, seed)
    a = random_tokens(pre_a, seed + 1) + passage + random_tokens(post, seed + 2)
    b = random_tokens(pre_b, seed + 3) + passage + random_tokens(post + 7, seed + 4)
    cuts_a = _cuts_in(content_spans(a, **CDC), pre_a, pre_a + len(passage))
    cuts_b = _cuts_in(content_spans(b, **CDC), pre_b, pre_b + len(passage))
    common = sorted(set(cuts_a) & set(cuts_b) & set(range(CDC["window"], len(passage) + 1)))
    assert common, (cuts_a, cuts_b)  # they meet (the first few candidates in the passage, in practice)
    assert [c for c in cuts_a if c >= common[0]] == [c for c in cuts_b if c >= common[0]]
    assert common[0] <= 400


def test_the_same_passage_gives_the_same_interior_chunk_keys_at_other_offsets_and_neighbours():
    passage = random_tokens(2000, 7)
    keys = []
    for k, (pre, post) in enumerate([(0, 50), (123, 1), (901, 400), (5, 5)]):
        prompt = random_tokens(pre, 100 + k) + passage + random_tokens(post, 200 + k)
        spans = content_spans(prompt, **CDC)
        inside = [(b - pre, e - pre) for b, e in spans if b >= pre and e <= pre + len(passage)]
        keys.append({chunk_key(NS, prompt[b + pre:e + pre]): (b, e) for b, e in inside})
    shared = set.intersection(*(set(k) for k in keys))
    share = sum(e - b for b, e in (keys[0][k] for k in shared)) / len(passage)
    assert share > 0.85, share  # all but the chunks at the passage's two edges
    assert all(keys[0][k] == keys[i][k] for k in shared for i in range(4))  # same chunk, same place in the passage


def test_a_one_token_edit_changes_only_the_chunks_around_it():
    base = random_tokens(20_000, 11)
    spans = content_spans(base, **CDC)
    changed = []
    for k in range(100, 19_000, 397):
        edited = base[:k] + [(base[k] + 1) % 49152] + base[k + 1:]
        spans_e = content_spans(edited, **CDC)
        # Chunks whose key changed: the one holding the edit, and any whose bounds moved.
        gone = [i for i, (b, e) in enumerate(spans) if b <= k < e or (b, e) not in set(spans_e)]
        assert gone == list(range(gone[0], gone[-1] + 1)), (k, gone)  # one run...
        assert spans[gone[0]][0] <= k < spans[gone[0]][1]  # ...starting at the edit
        resync = spans[gone[-1]][1]
        assert [s for s in spans if s[1] <= k] == [s for s in spans_e if s[1] <= k]
        assert [s for s in spans if s[0] >= resync] == [s for s in spans_e if s[0] >= resync]
        changed.append(len(gone))
    assert max(changed) <= 4 and sum(changed) / len(changed) < 2, changed


def test_chunker_picks_the_mode():
    from kvplug.core.chunking import chunker

    toks = [1, 2, 7, 8, 3, 4, 7, 8, 9] + random_tokens(500, 5)
    assert chunker("separator", S, **CDC)(toks) == chunk_spans(toks, S)
    assert chunker("content", S, **CDC)(toks) == content_spans(toks, **CDC)
    with pytest.raises(ValueError, match="chunking='lines': allowed values are separator, content"):
        chunker("lines", S, **CDC)


# ---- content chunking on text: framings and the chat template -------------------------------------

@pytest.fixture(scope="module")
def tiny_tok():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_model import tiny_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path())


def text_passages(n: int, lines_each: int = 14) -> list[str]:
    """Passages of ~400-600 tiny-tokenizer tokens: shuffled corpus lines with a number in each, so
    no two passages share a long run of text."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_model import training_corpus

    rng, lines = random.Random(5), training_corpus()
    return [" ".join(f"{rng.choice(lines)} ({p}.{i})" for i in range(lines_each)) for p in range(n)]


def framed(tok, framing: str, docs: list[str]) -> str:
    from tiny_model import CHAT_TEMPLATE

    if framing == "plain":
        return "\n\n".join(["Use the documents below.", *docs, "Question: what happened?"])
    if framing == "markdown":
        return "\n\n".join(["# Task", *(f"## Document {k + 1}\n\n{d}" for k, d in enumerate(docs)), "## Question"])
    messages = [{"role": "system", "content": "Answer from the documents."},
                {"role": "user", "content": "\n\n".join([*docs, "Question: what happened?"])}]
    return tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)


def passage_chunks(tok, text: str, passage: str) -> tuple[list[int], list[int], dict]:
    """The passage's tokens in this prompt, its cuts (relative to its first token) and the keys of
    the chunks wholly inside it (key -> relative span)."""
    enc = tok(text, return_offsets_mapping=True)
    lo = text.index(passage)
    inside = [i for i, (a, b) in enumerate(enc.offset_mapping) if lo <= a and b <= lo + len(passage) and b > a]
    t0, t1 = inside[0], inside[-1] + 1
    spans = content_spans(enc.input_ids, **CDC)
    keys = {chunk_key(NS, enc.input_ids[b:e]): (b - t0, e - t0) for b, e in spans if t0 <= b and e <= t1}
    return enc.input_ids[t0:t1], _cuts_in(spans, t0, t1), keys


@pytest.mark.parametrize("framings", [("plain", "plain"), ("plain", "markdown"), ("plain", "chat"),
                                      ("chat", "chat"), ("markdown", "chat")])
def test_passages_keep_their_chunks_under_other_framings_orders_and_the_chat_template(tiny_tok, framings):
    docs = text_passages(5)
    first = framed(tiny_tok, framings[0], docs)
    again = framed(tiny_tok, framings[1], [docs[3], docs[0], docs[4], docs[2], docs[1]])
    reused = total = 0
    for d in docs:
        toks_a, cuts_a, keys_a = passage_chunks(tiny_tok, first, d)
        toks_b, cuts_b, keys_b = passage_chunks(tiny_tok, again, d)
        assert toks_a == toks_b  # the framing does not change the passage's own tokens
        common = sorted(set(cuts_a) & set(cuts_b) & set(range(CDC["window"], len(toks_a) + 1)))
        assert common and [c for c in cuts_a if c >= common[0]] == [c for c in cuts_b if c >= common[0]]
        assert all(keys_a[k] == keys_b[k] for k in set(keys_a) & set(keys_b))
        reused += sum(e - b for b, e in (keys_b[k] for k in set(keys_a) & set(keys_b)))
        total += len(toks_b)
    assert reused / total > 0.7, reused / total  # all but a chunk or so at each end of each passage
