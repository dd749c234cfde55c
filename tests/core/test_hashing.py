import random

from kvplug.core.hashing import namespace_digest, prefix_block_keys

NS = namespace_digest(model="m", dtype="bfloat16", block_size=4)


def test_one_key_per_full_block_and_prefix_property():
    toks = [random.Random(1).randrange(50000) for _ in range(11)]
    keys = prefix_block_keys(NS, toks, 4)
    assert len(keys) == 2 and all(len(k) == 32 for k in keys)
    assert prefix_block_keys(NS, toks[:8], 4) == keys
    assert prefix_block_keys(NS, toks[:7], 4) == keys[:1]


def test_a_key_depends_on_everything_before_it():
    toks = list(range(100, 116))
    base = prefix_block_keys(NS, toks, 4)
    changed = toks.copy()
    changed[1] += 1
    other = prefix_block_keys(NS, changed, 4)
    assert all(a != b for a, b in zip(base, other))  # a change in block 0 changes every later key


def test_salt_model_and_dtype_separate_keys():
    toks = list(range(16))
    keys = {
        tuple(prefix_block_keys(NS, toks, 4)),
        tuple(prefix_block_keys(NS, toks, 4, cache_salt="tenant-a")),
        tuple(prefix_block_keys(NS, toks, 4, cache_salt="tenant-b")),
        tuple(prefix_block_keys(namespace_digest(model="m2", dtype="bfloat16", block_size=4), toks, 4)),
        tuple(prefix_block_keys(namespace_digest(model="m", dtype="float16", block_size=4), toks, 4)),
    }
    assert len(keys) == 5
    assert prefix_block_keys(NS, toks, 4, cache_salt="") == prefix_block_keys(NS, toks, 4)


def test_keys_are_stable_across_processes():
    # A golden value: keys name files on disk, so they must never change silently.
    assert prefix_block_keys(NS, [1, 2, 3, 4], 4)[0].hex()[:16] == "f8e1c4fe6b52cbcf"
    assert namespace_digest(a=1, b=2) == namespace_digest(b=2, a=1)


def test_bad_token_ids_and_block_sizes_are_value_errors():
    import pytest

    for tokens, bs in [([2**63], 1), ([1.5], 1), ([1, 2], 1.0), ([1, 2], 0), ([1, 2], True)]:
        with pytest.raises(ValueError):
            prefix_block_keys(NS, tokens, bs)
