"""LFU: evict the entry with the fewest accesses; ties go to the least recently used.

Least-Frequently-Used as in Shah, Mitra & Matani, "An O(1) algorithm for implementing the LFU
cache eviction scheme" (2010), with the LRU tie-break. Counting: insert() sets the count to 1,
each touch() adds 1; counts are never aged (use cost_aware or arc for aging).

Priorities (count, last-use sequence number) live in a lazy min-heap: insert/touch are
O(log n), remove O(1) amortised, victim() O(log n) plus O(log n) per pinned entry skipped.
victim() has no side effects on the order.
"""

from __future__ import annotations

from .base import CanEvict, EvictionPolicy, Key, LazyMinHeap


class LFUPolicy(EvictionPolicy):
    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._count: dict[Key, int] = {}
        self._heap = LazyMinHeap()
        self._clock = 0  # increases on every insert/touch: the LRU tie-break and uniqueness

    def _insert(self, key: Key, nbytes: int, cost: float) -> None:
        self._count[key] = 1
        self._stamp(key)

    def _touch(self, key: Key) -> None:
        self._count[key] += 1
        self._stamp(key)

    def _remove(self, key: Key, evicted: bool) -> None:
        del self._count[key]
        self._heap.discard(key)

    def _victim(self, can_evict: CanEvict) -> Key | None:
        return self._heap.first(can_evict)

    def _stamp(self, key: Key) -> None:
        self._clock += 1
        self._heap.set(key, (self._count[key], self._clock))
