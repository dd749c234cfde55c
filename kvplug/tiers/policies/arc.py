"""arc: Adaptive Replacement Cache, adapted to entries of different byte sizes.

Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache" (FAST 2003). Resident
entries sit in T1 (seen once since admission) or T2 (seen at least twice); ghost lists B1 and
B2 remember only the keys (and recorded sizes) of entries evicted from T1 and T2. Every list is
LRU ordered. The paper counts pages; here every count is in bytes (c = capacity_bytes):

  * insert, key in B1 (a ghost hit: T1 was too small):  p = min(c, p + n * max(1, |B2|/|B1|))
  * insert, key in B2 (T2 was too small):               p = max(0, p - n * max(1, |B1|/|B2|))
    where n is the entry's size and |B1|, |B2| are ghost bytes before the key leaves its ghost
    list; in both cases the entry goes to the MRU end of T2. Otherwise it goes to T1's MRU end.
  * touch: a T1 entry moves to T2's MRU end; a T2 entry becomes T2's MRU.
  * victim (the paper's REPLACE): LRU of T1 when |T1| > p, or when T1 is non-empty, the
    incoming key came from B2 and |T1| == p; otherwise LRU of T2. Non-evictable keys are
    skipped; if the preferred list has nothing evictable the other list is used. |T1| here
    excludes the incoming entry, because the paper runs REPLACE before admitting it.
  * remove(evicted=True) puts the key in B1 (from T1) or B2 (from T2); remove(evicted=False)
    (a deletion or move) forgets it entirely, so ghosts only learn from real evictions.
  * Ghost bounds, restored after every insert and eviction by dropping LRU ghosts:
    |T1| + |B1| <= c (trim B1) and |T1| + |T2| + |B1| + |B2| <= 2c (trim B2). Both hold
    whenever the resident bytes are <= c; while an insert has the tier over capacity the
    total may exceed 2c until the manager's evictions are done.

Call order (see base.py): insert-first order reproduces the paper exactly (p adapts, then
REPLACE runs for the newcomer). In evict-first order the policy cannot know the newcomer while
it names victims, so p adapts only after the room is made and the B2 tie rule never fires.

victim() has no side effects; repeated calls give the same key. All operations are O(1)
except victim(), which is O(pinned entries skipped).
"""

from __future__ import annotations

from .base import CanEvict, EvictionPolicy, Key, SizedQueue


class ARCPolicy(EvictionPolicy):
    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self.p = 0.0  # target bytes for T1; invariant 0 <= p <= capacity_bytes
        self._t1, self._t2 = SizedQueue(), SizedQueue()  # resident, oldest = LRU
        self._b1, self._b2 = SizedQueue(), SizedQueue()  # ghosts: keys + recorded sizes
        self._from_b2 = False  # the latest insert was a B2 ghost hit (REPLACE's tie rule)

    def _insert(self, key: Key, nbytes: int, cost: float) -> None:
        c, b1, b2 = self.capacity_bytes, self._b1, self._b2
        self._from_b2 = key in b2
        if key in b1:
            self.p = min(c, self.p + nbytes * max(1.0, b2.nbytes / b1.nbytes))
            b1.pop(key)
            self._t2.push(key, nbytes)
        elif key in b2:
            self.p = max(0.0, self.p - nbytes * max(1.0, b1.nbytes / b2.nbytes))
            b2.pop(key)
            self._t2.push(key, nbytes)
        else:
            self._t1.push(key, nbytes)
        self._trim_ghosts()

    def _touch(self, key: Key) -> None:
        if key in self._t1:
            self._t2.push(key, self._t1.pop(key))
        else:
            self._t2.to_newest(key)

    def _remove(self, key: Key, evicted: bool) -> None:
        src, ghost = (self._t1, self._b1) if key in self._t1 else (self._t2, self._b2)
        nbytes = src.pop(key)
        if evicted:
            ghost.push(key, nbytes)
            self._trim_ghosts()

    def _victim(self, can_evict: CanEvict) -> Key | None:
        incoming = self._incoming
        t1_bytes = self._t1.nbytes
        if incoming is not None and incoming in self._t1:
            t1_bytes -= self._t1.size_of(incoming)
        from_b2 = self._from_b2 and incoming is not None
        prefer_t1 = t1_bytes > 0 and (t1_bytes > self.p or (from_b2 and t1_bytes == self.p))
        lists = (self._t1, self._t2) if prefer_t1 else (self._t2, self._t1)
        for queue in lists:
            for key in queue:
                if can_evict(key):
                    return key
        return None

    def _trim_ghosts(self) -> None:
        c, t1, t2, b1, b2 = self.capacity_bytes, self._t1, self._t2, self._b1, self._b2
        while b1 and t1.nbytes + b1.nbytes > c:
            b1.pop_oldest()
        while b2 and t1.nbytes + t2.nbytes + b1.nbytes + b2.nbytes > 2 * c:
            b2.pop_oldest()

    def ghost_keys(self) -> tuple[list[Key], list[Key]]:
        """(B1, B2) keys, LRU first - for stats and tests."""
        return list(self._b1), list(self._b2)

    def list_bytes(self) -> dict[str, int]:
        """Bytes in T1, T2, B1, B2 (ghosts at their recorded sizes) - for stats and tests."""
        return {"t1": self._t1.nbytes, "t2": self._t2.nbytes, "b1": self._b1.nbytes, "b2": self._b2.nbytes}

    def resident_lists(self) -> tuple[list[Key], list[Key]]:
        """(T1, T2) keys, LRU first - for stats and tests."""
        return list(self._t1), list(self._t2)
