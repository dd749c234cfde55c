"""Fuzzing of kvplug's input parsers with hypothesis (bounded: max_examples per test, derandomized by the
"ci" profile in conftest.py). Every input ends in a clear error of the documented type or in a good
result, never in another exception:

    KVPlugConfig.from_dict(any JSON-like dict)             -> KVPlugConfig or ValueError
    remote.decode_value(random / truncated / flipped bytes) -> the written payload or CorruptUnit
    DiskStore.get on a fuzzed unit file                     -> the written payload or None (file removed)
    hashing.prefix_block_keys(tokens, block size, salt)    -> keys with the chain properties, or ValueError
    chunking.chunk_spans(tokens, separator)                -> spans tiling the prompt before its question
    chunking.content_spans(any JSON-like list, parameters) -> spans of min..max tokens tiling the prompt
                                                              before its question, or ValueError
    chunking.spans_from_ends(any JSON-like value, length)  -> spans tiling [0, last end), or ValueError

(The disk format's own reader is fuzzed in tests/tiers/test_disk_format.py.)
"""
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kvplug.config import BLEND_USER_KEYS, KVPlugConfig, NamespaceQuota, TierConfig
from kvplug.core.chunking import chunk_key, chunk_spans, content_spans, spans_from_ends
from kvplug.core.hashing import namespace_digest, prefix_block_keys
from kvplug.tiers.disk import DiskStore, unit_path
from kvplug.tiers.disk_format import KEY_BYTES, CorruptUnit
from kvplug.tiers.remote import decode_value, encode_value

KNOWN_KEYS = sorted([f for f in TierConfig.__dataclass_fields__] + ["namespaces", "model_id"] + list(BLEND_USER_KEYS))
LAYOUT = "fuzz-layout|float32"

# ---- config --------------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.floats() | st.text(max_size=20)
                | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
                | st.integers(min_value=10 ** 308, max_value=10 ** 400))  # beyond float range
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=8)
byte_values = (st.integers(min_value=-5, max_value=2 ** 70) | st.floats() | json_scalars)
quota = st.dictionaries(st.sampled_from(["cpu_bytes", "disk_bytes"]) | st.text(max_size=8), byte_values,
                        max_size=3) | json_values
value_for = {
    "namespaces": st.dictionaries(st.text(max_size=8), quota, max_size=3) | json_values,
    "eviction_policy": st.sampled_from(["lru", "lfu", "fifo", "arc", "s3fifo", "cost_aware", "LRU", ""]),
    "disk_write": st.sampled_from(["through", "on_evict", "never"]),
    "remote_url": st.sampled_from(["redis://127.0.0.1:1/0", "unix:///x.sock", "redis+cluster://h:1",
                                   "redis://", "http://x", "redis:/x"]) | json_scalars,
}
_SANDBOX = Path(tempfile.mkdtemp(prefix="kvplug-fuzz-config-"))


@pytest.fixture(scope="module", autouse=True)
def _remove_sandbox():
    yield
    shutil.rmtree(_SANDBOX, ignore_errors=True)


def _sandboxed(path):
    """Keep fuzzed disk_path strings inside a temp dir: from_dict creates the directory."""
    if not isinstance(path, str) or not path:
        return path
    return str(_SANDBOX / ("p" + path.replace("/", "_")))


@st.composite
def extra_configs(draw):
    keys = draw(st.lists(st.sampled_from(KNOWN_KEYS) | st.text(max_size=12), max_size=6, unique=True))
    extra = {}
    for k in keys:
        strategy = value_for[k] if k in value_for else byte_values if k.endswith("_bytes") else json_values
        extra[k] = draw(strategy | json_values)
    if "disk_path" in extra:
        extra["disk_path"] = _sandboxed(extra["disk_path"])
    return extra


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra_configs())
@example({"cpu_bytes": 10 ** 400})
@example({"remote_ttl_s": 10 ** 400})
@example({"namespaces": {"a": {"disk_bytes": 10 ** 400}}})
@example({"disk_path": _sandboxed("a\0b")})
@example({"disk_path": _sandboxed("x" * 300)})
@example({"remote_namespace": 5, "model_id": ["m"]})
def test_config_parser_returns_a_config_or_raises_value_error(extra):
    try:
        cfg = KVPlugConfig.from_dict(extra)
    except ValueError as e:
        assert str(e)  # a message, not a bare ValueError
        return
    assert set(extra) <= set(KNOWN_KEYS)
    t = cfg.tiers
    assert isinstance(t.cpu_bytes, int) and t.cpu_bytes >= 0 and isinstance(t.disk_bytes, int)
    assert t.eviction_policy in ("arc", "cost_aware", "fifo", "lfu", "lru", "s3fifo")
    assert all(isinstance(ns, str) and isinstance(q, NamespaceQuota) for ns, q in cfg.namespaces.items())
    assert cfg.to_dict()["cpu_bytes"] == t.cpu_bytes


# ---- remote values and disk files ------------------------------------------------------------------

def _unit(seed: int, nbytes: int):
    g = torch.Generator().manual_seed(seed)
    key = bytes(torch.randint(0, 256, (KEY_BYTES,), dtype=torch.uint8, generator=g).tolist())
    payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return key, payload


@st.composite
def mangled_values(draw):
    """(key, payload, value bytes, whether the value is the untouched encoding)."""
    key, payload = _unit(draw(st.integers(0, 2 ** 16)), draw(st.integers(0, 3000)))
    good = bytes(encode_value(key, LAYOUT, payload))
    how = draw(st.sampled_from(["keep", "truncate", "flip", "append", "random", "splice", "other_key",
                                "other_layout"]))
    if how == "keep":
        return key, payload, good, True
    if how == "truncate":
        value = good[:draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        i = draw(st.integers(0, len(good) - 1))
        value = good[:i] + bytes([good[i] ^ (1 << draw(st.integers(0, 7)))]) + good[i + 1:]
    elif how == "append":
        value = good + draw(st.binary(min_size=1, max_size=64))
    elif how == "random":
        value = draw(st.binary(max_size=4096))
    elif how == "splice":  # a valid prefix with garbage after some point
        i = draw(st.integers(0, len(good) - 1))
        value = good[:i] + draw(st.binary(min_size=1, max_size=64))
        assume(value != good[:len(value)] or len(value) != len(good))
    elif how == "other_key":
        value = bytes(encode_value(bytes(KEY_BYTES), LAYOUT, payload))
    else:
        value = bytes(encode_value(key, LAYOUT + "x", payload))
    return key, payload, value, value == good


@settings(max_examples=500, deadline=None)
@given(mangled_values(), st.sampled_from([bytes, bytearray, memoryview]))
def test_remote_decode_value_gives_the_payload_or_corrupt_unit(case, wrap):
    key, payload, value, intact = case
    try:
        out = decode_value(wrap(value), key, LAYOUT)
    except CorruptUnit as e:
        assert e.reason and not intact
        return
    assert intact and torch.equal(out, payload)


@pytest.mark.parametrize("value", [None, "text", 5, [b"x"], {"a": 1}, b"", bytearray(3)])
def test_remote_decode_value_of_other_types(value):
    with pytest.raises(CorruptUnit):
        decode_value(value, bytes(KEY_BYTES), LAYOUT)


@pytest.fixture(scope="module")
def disk_store(tmp_path_factory):
    with DiskStore(tmp_path_factory.mktemp("fuzz-disk"), LAYOUT) as store:
        yield store


@settings(max_examples=400, deadline=None)
@given(case=mangled_values())
def test_disk_get_of_a_fuzzed_file_gives_the_payload_or_a_miss(disk_store, case):
    key, payload, value, intact = case
    path = unit_path(disk_store.root, key, 0)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(value)
    corrupt_before = disk_store.stats.corrupt
    out = disk_store.get(key)  # never raises
    if intact:
        assert out is not None and torch.equal(out, payload)
        path.unlink()
    else:
        assert out is None and not path.exists()  # a bad file is removed, and counted
        assert disk_store.stats.corrupt == corrupt_before + 1


# ---- cache keys ----------------------------------------------------------------------------------

NS = namespace_digest(model="fuzz", dtype="float32", block_size=16)
salts = st.none() | st.text(max_size=20) | st.text(st.characters(codec="utf-8"), max_size=8) \
    | st.sampled_from(["", "\0", "é", "\ud800", "租户", "a" * 1000])
tokens = st.lists(st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1), max_size=300)


@settings(max_examples=500, deadline=None)
@given(tokens, st.integers(min_value=-4, max_value=40), salts)
def test_prefix_block_keys_gives_chained_keys_or_value_error(toks, block_size, salt):
    try:
        keys = prefix_block_keys(NS, toks, block_size, salt)
    except ValueError as e:  # block_size <= 0; a salt that is not encodable (lone surrogate)
        assert block_size <= 0 or "surrogate" in str(e)
        return
    assert block_size > 0 and len(keys) == len(toks) // block_size
    assert all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == len(keys)  # the chain makes every prefix's key distinct
    for n in range(len(keys)):  # a key names its whole prefix and nothing after it
        assert prefix_block_keys(NS, toks[:(n + 1) * block_size], block_size, salt) == keys[:n + 1]
    if keys:
        other = prefix_block_keys(NS, toks, block_size, (salt or "") + "x")
        assert other[0] != keys[0]  # cache_salt is part of the root: tenants never share a key
        assert prefix_block_keys(NS, toks, block_size, salt or None) == keys  # "" and None are one tenant


@pytest.mark.parametrize("toks", [range(0), (), [0] * 4096 * 16, list(range(10 ** 5))])
def test_prefix_block_keys_edges(toks):
    """Empty prompts give no key; a huge prompt gives one key per full block."""
    keys = prefix_block_keys(NS, toks, 16)
    assert len(keys) == len(toks) // 16



# ---- chunker ---------------------------------------------------------------------------------------

SEPS = st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=3).map(tuple)


@st.composite
def prompts_with_separators(draw):
    """Token lists over a tiny alphabet, so separators land at the edges, twice in a row and
    overlapping themselves; sometimes long."""
    sep = draw(SEPS)
    parts = draw(st.lists(st.lists(st.integers(min_value=0, max_value=5), max_size=6), max_size=12))
    tokens = []
    for part in parts:
        tokens += part + (list(sep) if draw(st.booleans()) else [])
    if draw(st.booleans()):
        tokens = list(sep) + tokens
    return tokens * draw(st.sampled_from([1, 1, 1, 2000])), sep


@settings(max_examples=400, deadline=None)
@given(prompts_with_separators())
def test_chunk_spans_tile_the_prompt_before_its_question(case):
    tokens, sep = case
    spans = chunk_spans(tokens, sep)
    at = 0
    for i, (b, e) in enumerate(spans):
        assert b == at < e, (spans, tokens, sep)
        if i or b:
            assert tuple(tokens[b:b + len(sep)]) == sep
        at = e
    if spans:
        assert tuple(tokens[at:at + len(sep)]) == sep  # the question starts with the last separator
        assert at + len(sep) <= len(tokens)
        assert len({chunk_key(b"ns", tokens[b:e]) for b, e in spans[:3]}) <= 3


token_ids = (st.integers(0, 5) | st.integers(0, 2 ** 17) | st.integers(-(2 ** 63), 2 ** 63 - 1)
             | st.integers(-(2 ** 70), 2 ** 70))


@st.composite
def content_prompts(draw):
    """Token lists: small alphabets (long runs of one window hash), any int64, ids past int64, other
    JSON values; sometimes repeated into long prompts. Parameters around their bounds."""
    tokens = draw(st.lists(token_ids, max_size=80) | st.lists(json_scalars, max_size=40) | json_values)
    if isinstance(tokens, list) and draw(st.booleans()):
        tokens = tokens * draw(st.sampled_from([1, 50, 3000]))
    w, lo = draw(st.integers(-1, 66)), draw(st.integers(-1, 40))
    target = lo + draw(st.integers(-1, 60))
    return tokens, {"window": w, "min_tokens": lo, "target_tokens": target,
                    "max_tokens": target + draw(st.integers(-1, 300))}


@settings(max_examples=400, deadline=None)
@given(content_prompts())
def test_content_spans_tile_the_prompt_or_raise_value_error(case):
    tokens, params = case
    try:
        spans = content_spans(tokens, **params)
    except ValueError:
        return
    at = 0
    for b, e in spans:
        assert b == at and params["min_tokens"] <= e - b <= params["max_tokens"], (spans, params)
        at = e
    assert not spans or at < len(tokens)  # the question keeps at least one token
    assert len(tokens) - at <= params["max_tokens"] or len(tokens) <= params["min_tokens"]


@settings(max_examples=400, deadline=None)
@given(json_values | st.lists(st.integers(min_value=-3, max_value=70), max_size=8), st.integers(-1, 64))
def test_spans_from_ends_tiles_or_raises_value_error(ends, n):
    try:
        spans = spans_from_ends(ends, n)
    except ValueError:
        return
    at = 0
    for b, e in spans:
        assert b == at < e <= n
        at = e
