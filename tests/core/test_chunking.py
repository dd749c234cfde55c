"""Chunk boundaries (separator and explicit ends) and position-independent chunk keys."""
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplug.core.chunking import chunk_key, chunk_spans, separator_ids, spans_from_ends
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
