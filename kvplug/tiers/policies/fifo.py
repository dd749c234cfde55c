"""FIFO: evict the entry inserted longest ago; hits do not change the order.

The oldest replacement rule (discussed as the baseline in Belady, "A Study of Replacement
Algorithms for a Virtual-Storage Computer", IBM Systems Journal 1966). An OrderedDict keeps
insertion order; every operation is O(1), victim() is O(pinned entries skipped) and has no
side effects.
"""

from __future__ import annotations

from collections import OrderedDict

from .base import CanEvict, EvictionPolicy, Key


class FIFOPolicy(EvictionPolicy):
    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._order: OrderedDict[Key, None] = OrderedDict()  # first = oldest insert

    def _insert(self, key: Key, nbytes: int, cost: float) -> None:
        self._order[key] = None

    def _touch(self, key: Key) -> None:
        pass  # by definition: hits never reorder a FIFO

    def _remove(self, key: Key, evicted: bool) -> None:
        del self._order[key]

    def _victim(self, can_evict: CanEvict) -> Key | None:
        return next((k for k in self._order if can_evict(k)), None)
