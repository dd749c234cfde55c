"""cost_aware: GreedyDual-Size-Frequency - keep what is expensive to recompute, often reused,
per byte held.

GDSF from Cherkasova, "Improving WWW Proxies Performance with Greedy-Dual-Size-Frequency
Caching Policy" (HP Labs HPL-98-69, 1998), in the flavour Cache-Craft (Agarwal et al.,
"Cache-Craft: Managing Chunk-Caches for Efficient Retrieval-Augmented Generation", 2025) uses
for chunk KV: the value of an entry is its recompute cost times its reuse, per byte.

    H(k) = L + freq(k) * cost(k) / nbytes(k)

  * insert: freq = 1, H computed with the current L (in insert-first order, see base.py, it is
    recomputed after each eviction made for it, as the paper scores after making room).
  * touch:  freq += 1, H recomputed with the current L (a hit refreshes the entry's age).
  * victim: the evictable entry with the smallest H; ties go to the entry whose H was set
    longest ago (insert or last touch), i.e. the least recently used of the equals.
  * remove(evicted=True): L = max(L, H(victim)). Inflating L makes entries admitted or hit
    later worth more than ones that have sat idle, so a once-hot entry is evicted eventually.
    The max() keeps L non-decreasing even when pinned entries forced a victim whose H is below
    an earlier L. remove(evicted=False) leaves L alone: deletions say nothing about value.

Lazy min-heap over (H, sequence): insert/touch O(log n), victim O(log n) plus O(log n) per
pinned entry skipped, no side effects on the order.
"""

from __future__ import annotations

from .base import CanEvict, EvictionPolicy, Key, LazyMinHeap


class CostAwarePolicy(EvictionPolicy):
    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self.inflation = 0.0  # L in the paper; only grows
        self._freq: dict[Key, int] = {}
        self._cost: dict[Key, float] = {}
        self._h: dict[Key, float] = {}
        self._heap = LazyMinHeap()
        self._clock = 0  # tie-break (older first) and keeps heap priorities unique

    def priority(self, key: Key) -> float:
        """H(key) as last computed (for stats and tests)."""
        self._require(key, "priority")
        return self._h[key]

    def _insert(self, key: Key, nbytes: int, cost: float) -> None:
        self._freq[key] = 1
        self._cost[key] = cost
        self._rescore(key)

    def _touch(self, key: Key) -> None:
        self._freq[key] += 1
        self._rescore(key)

    def _remove(self, key: Key, evicted: bool) -> None:
        if evicted:
            self.inflation = max(self.inflation, self._h[key])
        del self._freq[key], self._cost[key], self._h[key]
        self._heap.discard(key)
        incoming = self._incoming
        if evicted and incoming is not None and incoming != key:
            # Insert-first order: the paper scores a newcomer after making room, with the
            # inflated L; rescoring here makes both call orders give the same H.
            self._rescore(incoming)

    def _victim(self, can_evict: CanEvict) -> Key | None:
        return self._heap.first(can_evict)

    def _rescore(self, key: Key) -> None:
        h = self.inflation + self._freq[key] * self._cost[key] / self._sizes[key]
        self._h[key] = h
        self._clock += 1
        self._heap.set(key, (h, self._clock))
