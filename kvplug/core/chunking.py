"""Chunking for blending: where a prompt splits into chunks, and position-independent chunk keys.

A prompt is `chunk chunk ... question`; the question (the part after the last cut) is never
cached, always computed. Two ways to cut:

- separator: chunks are cut where the separator's tokens occur; the separator belongs to the
  chunk that follows it, so every chunk but the first starts with it, and the same text gives the
  same chunk tokens wherever it sits.
- content: content-defined chunking (as in LBFS / FastCDC, over token ids instead of bytes). A
  gear hash over the last `window` tokens marks candidate cuts; cuts are taken left to right at
  the first candidate at least `min_tokens` after the previous cut, and forced `max_tokens` after
  it when none comes. Whether a position is a candidate depends on its window alone, so a
  passage's cuts past its first `window` tokens depend only on its own tokens once one cut agrees
  (a candidate taken in both prompts), and the same passage gives the same chunk keys anywhere.

No torch, no vLLM: plain Python, and numpy for the rolling hash.

    separator_ids(token_ids, decode)           separator tokens with whitespace-only ends dropped
    chunk_spans(tokens, sep)                   [start, end) of each chunk before the last separator
    content_spans(tokens, window, min_tokens, target_tokens, max_tokens)
                                               [start, end) of each content-defined chunk
    chunker(mode, sep, window, min_tokens, target_tokens, max_tokens)
                                               tokens -> spans, for the engine's `chunking` mode
    spans_from_ends(ends, prompt_len)          [start, end) spans from explicit chunk end offsets
    chunk_key(namespace, tokens, cache_salt)   32-byte key of a chunk's own tokens (not its position)
"""
from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence

import numpy as np

_CHUNK_TAG = b"kvplug-chunk\0"
CHUNKING_MODES = ("separator", "content")
# Gear values: one 64-bit word per table slot, from a fixed SHAKE-128 stream, so cut points (and
# with them chunk keys, which name files shared between engines) never depend on the Python build.
_GEAR_SLOTS = 1 << 16
_GEAR = np.frombuffer(hashlib.shake_128(b"kvplug-gear-v1").digest(8 * _GEAR_SLOTS), dtype="<u8")
MAX_WINDOW = 64


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


def content_spans(tokens: Sequence[int], *, window: int, min_tokens: int, target_tokens: int,
                  max_tokens: int) -> list[tuple[int, int]]:
    """Content-defined chunks of `tokens`: spans tiling [0, last cut); the rest is the question.

    Position i (a cut between tokens i-1 and i) is a candidate when the gear hash of tokens
    [i-window, i) (fewer at the prompt's start) is below 2**window // (target - min + 1), so a
    chunk's expected length is about `target_tokens` (geometric past `min_tokens`). Cuts are never
    at 0 or len(tokens): every chunk has min_tokens..max_tokens tokens and the question at least
    one. Token ids must be int64 values (ValueError otherwise).
    """
    _check_content_params(window, min_tokens, target_tokens, max_tokens)
    try:
        n = len(tokens)
    except TypeError:  # None, a number: not a prompt (found by tests/test_fuzz_inputs.py)
        raise ValueError(f"token ids must be a sequence of int64 values, got {type(tokens).__name__}") from None
    if n <= min_tokens:
        return []
    threshold = (1 << window) // (target_tokens - min_tokens + 1)
    cands = _candidates(_token_array(tokens), window, threshold)
    bounds = [0, *_select(cands, len(tokens), min_tokens, max_tokens)]
    return list(zip(bounds, bounds[1:]))


def _check_content_params(window: int, min_tokens: int, target_tokens: int, max_tokens: int) -> None:
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window={window!r}: must be an integer from 1 to {MAX_WINDOW}")
    if not 1 <= min_tokens < target_tokens <= max_tokens:
        raise ValueError(f"min_tokens={min_tokens!r}, target_tokens={target_tokens!r}, max_tokens={max_tokens!r}: "
                         "need 1 <= min < target <= max")
    if target_tokens - min_tokens + 1 > 1 << window:
        raise ValueError(f"target_tokens - min_tokens = {target_tokens - min_tokens}: a {window}-token window "
                         f"allows at most {(1 << window) - 1}; widen the window")


def _token_array(tokens: Sequence[int]) -> np.ndarray:
    try:
        a = np.asarray(tokens)
    except (ValueError, TypeError) as e:
        raise ValueError(f"token ids must be int64 values: {e}") from e
    if a.ndim != 1 or a.dtype.kind not in "iu" or a.dtype == np.uint64:  # uint64: past int64's range
        raise ValueError(f"token ids must be int64 values, got an array of {a.dtype} with shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _candidates(ids: np.ndarray, window: int, threshold: int) -> list[int]:
    """Positions i (a cut after token i-1) where the gear hash of the last `window` tokens is below
    threshold. The rolling gear hash h_i = (2 h_{i-1} + g_i) mod 2**window equals
    sum_j g_(i-j) 2**j over j < window: a token's value shifts out after `window` steps, so the
    hash is a function of the window alone, computed here as that sum, one vector op per j."""
    if len(ids) and (ids.min() < 0 or ids.max() >= _GEAR_SLOTS):  # most vocabularies index the table directly
        ids = (ids ^ (ids >> 16) ^ (ids >> 32) ^ (ids >> 48)) & (_GEAR_SLOTS - 1)
    g = _GEAR[ids]
    h = g.copy()
    for j in range(1, min(window, len(g))):
        h[j:] += g[:-j] << np.uint64(j)  # uint64 wraps mod 2**64, a multiple of 2**window
    if window < 64:
        h &= np.uint64((1 << window) - 1)
    return (np.flatnonzero(h < np.uint64(threshold)) + 1).tolist()


def _select(cands: list[int], n: int, min_tokens: int, max_tokens: int) -> list[int]:
    """Cuts left to right: the first candidate >= min_tokens after the previous cut if it is within
    max_tokens, else a forced cut max_tokens after it; none at n or beyond (the question keeps at
    least one token). One bisection per cut, not a step per candidate."""
    cuts, last = [], 0
    while True:
        i = bisect_left(cands, last + min_tokens)
        c = min(cands[i] if i < len(cands) else n, last + max_tokens)
        if c >= n:
            return cuts
        cuts.append(c)
        last = c


def chunker(mode: str, sep: tuple[int, ...] = (), *, window: int, min_tokens: int, target_tokens: int,
            max_tokens: int) -> Callable[[Sequence[int]], list[tuple[int, int]]]:
    """The engine's chunking (`chunking` key) as one function of a prompt's tokens."""
    if mode == "separator":
        return lambda tokens: chunk_spans(tokens, sep)
    if mode == "content":
        _check_content_params(window, min_tokens, target_tokens, max_tokens)
        return lambda tokens: content_spans(tokens, window=window, min_tokens=min_tokens,
                                            target_tokens=target_tokens, max_tokens=max_tokens)
    raise ValueError(f"chunking={mode!r}: allowed values are {', '.join(CHUNKING_MODES)}")


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
