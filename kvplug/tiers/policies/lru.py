"""LRU: evict the entry least recently inserted or touched.

The classic stack policy (Mattson, Gecsei, Slutz & Traiger, "Evaluation Techniques for Storage
Hierarchies", IBM Systems Journal 1970). An OrderedDict keeps recency order; every operation is
O(1), victim() is O(pinned entries skipped). victim() has no side effects.
"""

from __future__ import annotations

from collections import OrderedDict

from .base import CanEvict, EvictionPolicy, Key


class LRUPolicy(EvictionPolicy):
    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._order: OrderedDict[Key, None] = OrderedDict()  # first = least recently used

    def _insert(self, key: Key, nbytes: int, cost: float) -> None:
        self._order[key] = None

    def _touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def _remove(self, key: Key, evicted: bool) -> None:
        del self._order[key]

    def _victim(self, can_evict: CanEvict) -> Key | None:
        return next((k for k in self._order if can_evict(k)), None)
