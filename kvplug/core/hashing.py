"""Cache keys: 32-byte SHA-256 digests that include everything that changes KV.

vLLM's own block hashes are seeded with a random value per process unless
PYTHONHASHSEED is set, so they cannot name KV across restarts or engines. We chain
our own, over the same block boundaries:

    namespace = H("kvplug-ns", LAYOUT_VERSION, model, dtype, kv_cache_dtype, block_size, tp, extra...)
    root      = H(namespace, cache_salt)                 # tenant isolation at the root
    key[i]    = H(key[i-1] or root, tokens of block i)   # a key names its whole prefix

    namespace_digest(**fields)                 the namespace of one engine configuration
    prefix_block_keys(ns, tokens, bs, salt)    keys of the full blocks of a token prefix
"""
from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence

# Bump when the byte layout of stored units changes: old units then simply miss.
LAYOUT_VERSION = 1


def namespace_digest(**fields: object) -> bytes:
    """Digest of the engine facts that change KV bytes (model, dtypes, block size, ...)."""
    body = json.dumps({"kvplug": LAYOUT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(b"kvplug-ns\0" + body.encode()).digest()


def prefix_block_keys(
    namespace: bytes, tokens: Sequence[int], block_size: int, cache_salt: str | None = None
) -> list[bytes]:
    """Keys of the len(tokens) // block_size full blocks; key i depends on tokens[: (i+1)*bs]."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r}: must be an int > 0")
    salt = (cache_salt or "").encode()
    parent = hashlib.sha256(namespace + b"salt\0" + len(salt).to_bytes(4, "little") + salt).digest()
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        try:
            block = array("q", tokens[start : start + block_size]).tobytes()
        except (OverflowError, TypeError) as e:
            raise ValueError(f"token ids must be int64 values: {e}") from e
        parent = hashlib.sha256(parent + block).digest()
        keys.append(parent)
    return keys
