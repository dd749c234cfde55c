"""The remote tier as kvplug uses it: a Redis-protocol store shared across machines
(kvplug/tiers/remote.py). Its capacity and expiry are the store's own, and other machines write
and evict it, so the scheduler asks it (RemoteIndex: one pipelined round trip per lookup, a miss
on any error) instead of keeping an index.

RemoteTier (registered as "remote"; configured by remote_url, remote_namespace, remote_ttl_s,
remote_timeout_ms; see kvplug/tiers/tier.py for the spec's methods):
    index(tp_size) -> RemoteView      contains_many: every rank's value exists
    store(layout, rank) -> RemoteStore
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvplug.tiers.tier import TierSpec, register_tier


@register_tier("remote")
class RemoteTier(TierSpec):
    loads_async = True
    COUNTERS = {
        "write_bytes": "bytes written to the remote store",
        "read_bytes": "bytes read from the remote store",
        "errors": "remote timeouts, failed writes and writes dropped while the store was down",
        "corrupt": "remote values found corrupt or foreign and deleted",
    }

    def __init__(self, url: str, namespace: str = "kvplug", ttl_s: float = 0.0, timeout_s: float = 0.05,
                 codec: str = "none"):
        self.url, self.namespace, self.ttl_s, self.timeout_s, self.codec = url, namespace, ttl_s, timeout_s, codec

    @classmethod
    def from_config(cls, tiers, options: Mapping[str, Any] | None) -> "RemoteTier | None":
        if options is not None:
            raise ValueError("tiers.remote: the remote tier is configured by remote_url, remote_namespace, "
                             "remote_ttl_s, remote_timeout_ms and remote_codec")
        if tiers.remote_url is None:
            return None
        return cls(tiers.remote_url, tiers.remote_namespace, tiers.remote_ttl_s, tiers.remote_timeout_ms / 1000,
                   tiers.remote_codec)

    def index(self, tp_size: int) -> "RemoteView":
        from kvplug.tiers.remote import RemoteIndex  # redis-py is imported only when the tier is used

        return RemoteView(RemoteIndex(self.url, namespace=self.namespace, timeout_s=self.timeout_s), tp_size)

    def store(self, layout: str, rank: int, codec=None):
        from kvplug.tiers.remote import RemoteStore

        return RemoteStore(self.url, layout, rank=rank, namespace=self.namespace, ttl_s=self.ttl_s,
                           timeout_s=self.timeout_s, codec=codec)

    def counters(self, s: Mapping[str, int]) -> dict[str, int]:
        return {"write_bytes": s.get("bytes_written", 0), "read_bytes": s.get("bytes_read", 0),
                "errors": s.get("timeouts", 0) + s.get("write_errors", 0) + s.get("dropped", 0),
                "corrupt": s.get("corrupt", 0)}


class RemoteView:
    """The remote store asked directly: what this engine plans changes nothing it could know."""

    def __init__(self, index, tp_size: int):
        self.remote, self.tp_size = index, tp_size

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return self.remote.exists_many(list(keys), ranks=self.tp_size) if keys else []

    def noted(self, key: bytes, held: bool) -> None:
        return

    def lost(self, keys: Sequence[bytes]) -> None:
        return

    def restored(self, keys: Sequence[bytes]) -> None:
        return

    def close(self) -> None:
        self.remote.close()
