"""A tier kvplug does not ship, defined here to show that adding one is one file: a spec
registered by name, its options checked, a scheduler-side view (HeldUnits: what the scheduler
planned, less what the worker reports lost) and a worker-side store. Its units live in a dict
that stands in for a store shared by the engine's processes (the tests run both halves in one).
"""
from __future__ import annotations

import threading

from kvplug.tiers.tier import HeldUnits, Restored, TierSpec, register_tier

UNITS: dict[tuple[int, bytes], tuple[str, object]] = {}  # (rank, key) -> (layout, payload)


@register_tier("memtest")
class MemTier(TierSpec):
    loads_async = False  # reads are quick: loaded before the forward pass, in the step
    COUNTERS = {"writes": "units written to the test tier", "dropped": "writes refused (drop_writes)"}

    def __init__(self, capacity_bytes: int, drop_writes: bool = False):
        self.capacity_bytes, self.drop_writes = capacity_bytes, drop_writes

    @classmethod
    def from_config(cls, tiers, options):
        if options is None:
            return None
        unknown = sorted(set(options) - {"bytes", "drop_writes"})
        if unknown:
            raise ValueError(f"tiers.memtest: unknown option {unknown[0]!r}; allowed: bytes, drop_writes")
        return cls(int(options.get("bytes", 1 << 20)), bool(options.get("drop_writes", False)))

    def index(self, tp_size: int):
        return HeldUnits()

    def store(self, layout: str, rank: int):
        return MemStore(layout, rank, self.drop_writes)

    def restore(self, store, layouts) -> Restored:
        keys = [k for (r, k), (lay, _) in UNITS.items() if r == store.rank and lay in layouts]
        return Restored(keys, [UNITS[(store.rank, k)][1].numel() for k in keys], [0.0] * len(keys))


class MemStore:
    def __init__(self, layout: str, rank: int, drop_writes: bool):
        self.layout, self.rank, self.drop_writes = layout, rank, drop_writes
        self._lost, self._stats, self._lock = [], {"writes": 0, "dropped": 0}, threading.Lock()

    def lookup(self, keys):
        return [(self.rank, k) in UNITS for k in keys]

    def get_many(self, keys, layout=None):
        out = []
        for k in keys:
            lay, payload = UNITS.get((self.rank, k), (None, None))
            out.append(payload if lay == (layout or self.layout) else None)
        return out

    def put_many(self, units):
        with self._lock:
            for u in units:
                if self.drop_writes:
                    self._lost.append(u.key)
                    self._stats["dropped"] += 1
                    continue
                UNITS[(self.rank, u.key)] = (u.layout or self.layout, u.payload.clone())
                self._stats["writes"] += 1

    def delete_many(self, keys):
        for k in keys:
            UNITS.pop((self.rank, k), None)

    def take_lost(self):
        with self._lock:
            lost, self._lost = self._lost, []
        return lost

    def take_stats(self):
        with self._lock:
            out, self._stats = self._stats, {"writes": 0, "dropped": 0}
        return out

    def flush(self):
        return

    def close(self):
        return
