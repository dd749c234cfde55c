"""One tier's accounting: which units it holds, their sizes, eviction order, tenant quotas.

Every unit belongs to a namespace (the request's cache_salt; "" without one). A namespace
with a quota evicts its own units when it reaches the quota, so one tenant cannot push
everyone else out; the tier's capacity then evicts by the policy across all namespaces.
A namespace with a TTL has its units count as absent once they are older than it.

The eviction contract (kvplug/tiers/policies/base.py), in the one order used here: admit()
inserts the unit into the policy first, then takes the policy's victims while the namespace is
over its quota or the tier over its capacity. The policy sees the newcomer before it chooses
(ARC's and S3-FIFO's ghost hits, GDSF's priority) and offers it only as the last resort; if it
would be the only victim left, it never fit and is not admitted.

    admit(key, ns, cost, pinned, nbytes=None)   account the unit, evicting to make room;
                                                returns (admitted, [(evicted key, its ns)])
    remove(key)                    forget a unit (not an eviction)
    touch(key)                     a hit
    expired(key)                   held past its namespace's TTL (serve nothing from it)
    size_of(key)                   the bytes accounted for a held unit
    __contains__, __len__, used, used_by(ns)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping

from kvplug.tiers.policies import make_policy


class TierIndex:
    def __init__(self, capacity_bytes: int, unit_bytes: int, policy: str, quotas: Mapping[str, int] | None = None,
                 ttls: Mapping[str, float] | None = None, clock=time.monotonic):
        self.capacity = capacity_bytes
        self.unit_bytes = unit_bytes  # the size of a unit admitted without one
        self.quotas = dict(quotas or {})
        self.ttls = {ns: t for ns, t in (ttls or {}).items() if t}
        self._clock = clock
        self._born: dict[bytes, float] = {}
        self._policy = make_policy(policy, max(capacity_bytes, 1))
        self._ns: dict[bytes, str] = {}
        self._size: dict[bytes, int] = {}
        self._ns_used: dict[str, int] = {}
        self._used = 0  # invariant: == sum(self._size.values())

    def __contains__(self, key: bytes) -> bool:
        return key in self._ns

    def __len__(self) -> int:
        return len(self._ns)

    @property
    def used(self) -> int:
        return self._used

    def used_by(self, ns: str) -> int:
        return self._ns_used.get(ns, 0)

    def size_of(self, key: bytes) -> int:
        return self._size[key]

    def touch(self, key: bytes) -> None:
        self._policy.touch(key)

    def expired(self, key: bytes) -> bool:
        ttl = self.ttls.get(self._ns.get(key, ""))
        return ttl is not None and key in self._born and self._clock() - self._born[key] > ttl

    def admit(self, key: bytes, ns: str, cost: float, pinned: Container[bytes],
              nbytes: int | None = None) -> tuple[bool, list[tuple[bytes, str]]]:
        if key in self._ns:
            return True, []
        nbytes = self.unit_bytes if nbytes is None else nbytes
        quota = self.quotas.get(ns)
        if nbytes > self.capacity or (quota is not None and nbytes > quota):
            return False, []  # could never fit: evict nothing for it
        self._policy.insert(key, nbytes, cost)
        self._account(key, ns, nbytes)
        evicted: list[tuple[bytes, str]] = []
        fits = True
        if quota is not None:
            fits = self._shrink(key, lambda: self.used_by(ns) <= quota,
                                lambda k: k not in pinned and self._ns[k] == ns, evicted)
        fits = fits and self._shrink(key, lambda: self.used <= self.capacity, lambda k: k not in pinned, evicted)
        if not fits:
            if key in self._ns:
                self.remove(key)
            return False, evicted
        return True, evicted

    def _shrink(self, incoming: bytes, fits: Callable[[], bool], can_evict: Callable[[bytes], bool],
                evicted: list[tuple[bytes, str]]) -> bool:
        """Evict the policy's victims until fits(); False when nothing but the newcomer is left
        to evict (the policy's last resort: it never fit)."""
        while not fits():
            victim = self._policy.victim(lambda k: k != incoming and can_evict(k))
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

    def _account(self, key: bytes, ns: str, nbytes: int) -> None:
        self._ns[key] = ns
        self._size[key] = nbytes
        self._born[key] = self._clock()
        self._ns_used[ns] = self.used_by(ns) + nbytes
        self._used += nbytes

    def _drop(self, key: bytes) -> str:
        ns = self._ns.pop(key)
        nbytes = self._size.pop(key)
        self._born.pop(key, None)
        self._ns_used[ns] -= nbytes
        self._used -= nbytes
        return ns
