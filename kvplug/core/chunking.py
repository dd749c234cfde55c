"""Chunking for blending: where a prompt splits into chunks, and position-independent chunk keys.

A prompt is `chunk chunk ... question`. Chunks are cut where the separator's tokens occur; the
separator belongs to the chunk that follows it, so every chunk but the first starts with it, and
the same text gives the same chunk tokens wherever it sits. The part from the last separator on is
the question: never cached, always computed. Pure Python (no torch, no vLLM).

    separator_ids(token_ids, decode)           separator tokens with whitespace-only ends dropped
    chunk_spans(tokens, sep)                   [start, end) of each chunk before the last separator
    spans_from_ends(ends, prompt_len)          [start, end) spans from explicit chunk end offsets
    chunk_key(namespace, tokens, cache_salt)   32-byte key of a chunk's own tokens (not its position)
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence

_CHUNK_TAG = b"kvplug-chunk\0"


def separator_ids(token_ids: list[int], decode: Callable[[list[int]], str]) -> tuple[int, ...]:
    """The separator's tokens without leading/trailing tokens that decode to whitespace only.

    BPE tokenizers attach a space to the word after it: SmolLM2 tokenizes " # # " alone as
    [907, 907, 216] but "a # # b" as [.., 907, 907, 278], so the trailing space token would never
    match inside a prompt. Raises ValueError when only whitespace tokens are left.
    """
    ids = list(token_ids)
    lo, hi = 0, len(ids)
    while lo < hi and not decode([ids[lo]]).strip():
        lo += 1
    while hi > lo and not decode([ids[hi - 1]]).strip():
        hi -= 1
    if lo == hi:
        raise ValueError(f"chunk separator tokens {ids!r} are empty or decode to whitespace only; "
                         "choose a chunk_separator with visible characters")
    return tuple(ids[lo:hi])


def _occurrences(tokens: Sequence[int], sep: tuple[int, ...]) -> list[int]:
    """Start offsets of non-overlapping occurrences of sep, found left to right."""
    n, first, out = len(sep), sep[0], []
    toks = list(tokens)
    i, last = 0, len(toks) - n
    while i <= last:
        try:
            i = toks.index(first, i, last + 1)
        except ValueError:
            break
        if tuple(toks[i:i + n]) == sep:
            out.append(i)
            i += n
        else:
            i += 1
    return out


def chunk_spans(tokens: Sequence[int], sep: tuple[int, ...]) -> list[tuple[int, int]]:
    """Spans of the chunks before the last occurrence of sep (the tail after it is the question).

    Segment 0 runs from 0 to the first occurrence; each occurrence starts a segment that runs to the
    next one. Empty segments (a prompt that starts with sep) are skipped. The spans tile
    [0, start of the last occurrence) exactly; no occurrence gives [].
    """
    sep = tuple(sep)
    if not sep:
        raise ValueError("sep must hold at least one token")
    starts = _occurrences(tokens, sep)
    bounds = [0, *starts]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def spans_from_ends(ends: Sequence[int], prompt_len: int) -> list[tuple[int, int]]:
    """[(0, e0), (e0, e1), ...] from explicit chunk end offsets given with a request.

    `ends` must be a list of ints, strictly increasing, each in (0, prompt_len]; anything else is a
    ValueError that says what is wrong (bools are not ints).
    """
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 0:
        raise ValueError(f"prompt_len={prompt_len!r}: must be an int >= 0")
    if not isinstance(ends, (list, tuple)):
        raise ValueError(f"chunk ends={ends!r}: must be a list of token offsets")
    prev, spans = 0, []
    for i, e in enumerate(ends):
        if isinstance(e, bool) or not isinstance(e, int):
            raise ValueError(f"chunk ends[{i}]={e!r}: must be an int token offset")
        if not prev < e <= prompt_len:
            raise ValueError(f"chunk ends[{i}]={e}: must be > {prev} (strictly increasing, > 0) and "
                             f"<= the prompt length {prompt_len}")
        spans.append((prev, e))
        prev = e
    return spans


def chunk_key(namespace: bytes, tokens: Sequence[int], cache_salt: str | None = None) -> bytes:
    """SHA-256 of tag, length-prefixed namespace and salt and the tokens (int64): the same chunk text
    gets the same key at any position, in any prompt, of the same engine configuration and tenant."""
    if not isinstance(namespace, bytes):
        raise ValueError(f"namespace must be bytes (see namespace_digest), got {type(namespace).__name__}")
    salt = (cache_salt or "").encode()
    try:
        body = array("q", tokens).tobytes()
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token ids must be int64 values: {e}") from e
    h = hashlib.sha256(_CHUNK_TAG)
    h.update(len(namespace).to_bytes(4, "little") + namespace)  # prefixed: field bounds are unambiguous
    h.update(b"salt\0" + len(salt).to_bytes(4, "little") + salt)
    h.update(body)
    return h.digest()
