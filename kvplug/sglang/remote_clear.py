"""Remove one layout's units of one rank from a Redis-protocol store (SGLang's `clear`).

Remote keys do not say which engine wrote them (kvplug.tiers.remote.redis_key is namespace, key and
rank), so each candidate's header is read (GETRANGE of its first bytes, never the payload) and only
values whose layout tag is ours are deleted: other engines, layouts and tenants sharing the
namespace keep theirs. Best effort: a network error stops the sweep with one warning.

    clear_remote(url, namespace, rank, layout, timeout_s) -> int   how many values were deleted
"""
from __future__ import annotations

import io
import logging

from kvplug.tiers.disk_format import CorruptUnit, read_header
from kvplug.tiers.remote import make_client

logger = logging.getLogger("kvplug")

_BATCH = 256
# kvplug's SGLang headers are a few hundred bytes; a longer one is not ours and is left alone.
_HEAD_BYTES = 4096


def clear_remote(url: str, namespace: str, rank: int, layout: str, timeout_s: float) -> int:
    deleted = 0
    try:
        client = make_client(url, max(timeout_s, 1.0))  # a sweep, not a lookup: allow a slower answer
        names = []
        for name in client.scan_iter(match=f"{_glob_escape(namespace)}:*:r{rank}", count=1000):
            names.append(name)
            if len(names) == _BATCH:
                deleted += _delete_ours(client, names, layout)
                names = []
        deleted += _delete_ours(client, names, layout)
        client.close()
    except Exception as e:  # the remote tier is optional: clear what we can, never raise into SGLang
        logger.warning("kvplug SGLang backend: clearing the remote tier stopped after %d values: %s", deleted, e)
    return deleted


def _delete_ours(client, names: list, layout: str) -> int:
    if not names:
        return 0
    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.getrange(n, 0, _HEAD_BYTES - 1)
    heads = pipe.execute(raise_on_error=False)
    ours = [n for n, h in zip(names, heads) if _layout_of(h) == layout]
    if ours:
        client.delete(*ours)
    return len(ours)


def _layout_of(head) -> str | None:
    if not isinstance(head, (bytes, bytearray)):
        return None
    try:
        return read_header(io.BytesIO(head)).layout
    except CorruptUnit:
        return None


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
