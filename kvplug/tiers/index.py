"""One tier's accounting: which units it holds, bytes used, eviction order, tenant quotas.

Every unit belongs to a namespace (the request's cache_salt; "" without one). A namespace
with a quota evicts its own units when it reaches the quota, so one tenant cannot push
everyone else out; the tier's capacity then evicts by the policy across all namespaces.
A namespace with a TTL has its units count as absent once they are older than it.

    admit(key, ns, cost, pinned)   make room and account the unit; returns (admitted, [(evicted key, its ns)])
    remove(key)                    forget a unit (not an eviction)
    touch(key)                     a hit
    expired(key)                   held past its namespace's TTL (serve nothing from it)
    __contains__, __len__, used, used_by(ns)
"""
from __future__ import annotations

import time
from collections.abc import Container, Mapping

from kvplug.tiers.policies import make_policy


class TierIndex:
    def __init__(self, capacity_bytes: int, unit_bytes: int, policy: str, quotas: Mapping[str, int] | None = None,
                 ttls: Mapping[str, float] | None = None, clock=time.monotonic):
        self.capacity = capacity_bytes
        self.unit_bytes = unit_bytes
        self.quotas = dict(quotas or {})
        self.ttls = {ns: t for ns, t in (ttls or {}).items() if t}
        self._clock = clock
        self._born: dict[bytes, float] = {}
        self._policy = make_policy(policy, max(capacity_bytes, 1))
        self._ns: dict[bytes, str] = {}
        self._ns_used: dict[str, int] = {}

    def __contains__(self, key: bytes) -> bool:
        return key in self._ns

    def __len__(self) -> int:
        return len(self._ns)

    @property
    def used(self) -> int:
        return len(self._ns) * self.unit_bytes

    def used_by(self, ns: str) -> int:
        return self._ns_used.get(ns, 0)

    def touch(self, key: bytes) -> None:
        self._policy.touch(key)

    def expired(self, key: bytes) -> bool:
        ttl = self.ttls.get(self._ns.get(key, ""))
        return ttl is not None and key in self._born and self._clock() - self._born[key] > ttl

    def admit(self, key: bytes, ns: str, cost: float, pinned: Container[bytes]) -> tuple[bool, list[tuple[bytes, str]]]:
        if key in self._ns:
            return True, []
        evicted: list[tuple[bytes, str]] = []
        quota = self.quotas.get(ns)
        if quota is not None and not self._evict_until(
            lambda: self.used_by(ns) + self.unit_bytes <= quota,
            lambda k: k not in pinned and self._ns[k] == ns, evicted):
            return False, evicted
        if not self._evict_until(lambda: self.used + self.unit_bytes <= self.capacity,
                                 lambda k: k not in pinned, evicted):
            return False, evicted
        self._ns[key] = ns
        self._born[key] = self._clock()
        self._ns_used[ns] = self.used_by(ns) + self.unit_bytes
        self._policy.insert(key, self.unit_bytes, cost)
        return True, evicted

    def _evict_until(self, fits, can_evict, evicted: list[tuple[bytes, str]]) -> bool:
        while not fits():
            victim = self._policy.victim(can_evict)
            if victim is None:
                return False
            self._policy.remove(victim, evicted=True)
            evicted.append((victim, self._drop(victim)))
        return True

    def remove(self, key: bytes) -> bool:
        if key not in self._ns:
            return False
        self._policy.remove(key, evicted=False)
        self._drop(key)
        return True

    def _drop(self, key: bytes) -> str:
        ns = self._ns.pop(key)
        self._born.pop(key, None)
        self._ns_used[ns] -= self.unit_bytes
        return ns
