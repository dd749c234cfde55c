"""s3fifo: three FIFO queues - a small probation queue, a main queue and a ghost queue.

Yang, Zhang, Qiu, Yue & Vinayak, "FIFO queues are all you need for cache eviction" (SOSP 2023),
with byte sizes: S (small, target 10% of capacity bytes), M (main, the rest) and G (ghost: keys
and recorded sizes of entries evicted from S, at most M's share - 90% of capacity - in bytes,
oldest dropped first). Each resident entry has a frequency capped at 3.

  * insert: a key found in G leaves G and enters M's head; any other key enters S's head;
    freq = 0.
  * touch: freq = min(freq + 1, 3). Hits never move entries (FIFO, lock-free in the paper).
  * victim: if S bytes >= 10% of capacity, or M is empty, scan S first, else M first; if the
    first queue yields nothing evictable, scan the other.
      S scan, from the tail: freq > 0 -> move to M's head with freq 0 (the entry proved it is
      not a one-hit wonder) and go on; freq == 0 -> that is the victim.
      M scan, from the tail: freq > 0 -> freq -= 1 and reinsert at M's head (second chance)
      and go on; freq == 0 -> that is the victim.
    Non-evictable entries are passed over untouched and stay at their queue's tail. A scan
    ends when it finds a victim or has passed every entry of its queue, so a full pass with
    every entry non-evictable returns None (M is passed at most 4 times: freq <= 3).
    The incoming entry (latest insert) is left out of the S/M byte counts and scans, because
    the paper evicts before it admits.
  * remove(evicted=True) of an S entry adds its key to G; evictions from M and every
    remove(evicted=False) (deletions, moves) leave G alone.

Call order (see base.py): both work. In evict-first order a newcomer's ghost entry can be
trimmed from G by the evictions made for it before insert() looks it up (then it goes to S).

victim() moves entries (S -> M promotions, M rotations) as the paper's eviction loop does, so
call it once per eviction and remove() the key it names: a second call may name another key
(promotions can drop S below its 10% and switch the scan to M). Cost: amortised O(1) per entry
moved, plus O(pinned entries passed over).
"""

from __future__ import annotations

from .base import CanEvict, EvictionPolicy, Key, SizedQueue

MAX_FREQ = 3  # the paper's 2-bit counter


class S3FIFOPolicy(EvictionPolicy):
    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self.small_target = capacity_bytes / 10  # S's share, bytes
        self.ghost_limit = capacity_bytes - self.small_target  # M's share bounds G, bytes
        self._small, self._main, self._ghost = SizedQueue(), SizedQueue(), SizedQueue()
        self._freq: dict[Key, int] = {}  # resident key -> 0..MAX_FREQ

    def _insert(self, key: Key, nbytes: int, cost: float) -> None:
        if key in self._ghost:
            self._ghost.pop(key)
            self._main.push(key, nbytes)
        else:
            self._small.push(key, nbytes)
        self._freq[key] = 0

    def _touch(self, key: Key) -> None:
        self._freq[key] = min(self._freq[key] + 1, MAX_FREQ)

    def _remove(self, key: Key, evicted: bool) -> None:
        del self._freq[key]
        if key not in self._small:
            self._main.pop(key)
            return
        nbytes = self._small.pop(key)
        if evicted:
            self._ghost.push(key, nbytes)
            while self._ghost.nbytes > self.ghost_limit:
                self._ghost.pop_oldest()

    def _victim(self, can_evict: CanEvict) -> Key | None:
        small_bytes = self._queued_bytes(self._small)
        main_bytes = self._queued_bytes(self._main)
        if small_bytes >= self.small_target or main_bytes == 0:
            scans = (self._scan_small, self._scan_main)
        else:
            scans = (self._scan_main, self._scan_small)
        # A last look at M: scanning S may have just promoted the only evictable entries there.
        for scan in (*scans, self._scan_main):
            found = scan(can_evict)
            if found is not None:
                return found
        return None

    def _queued_bytes(self, queue: SizedQueue) -> int:
        """Bytes in queue, not counting the incoming entry (it is not admitted yet)."""
        incoming = self._incoming
        if incoming is not None and incoming in queue:
            return queue.nbytes - queue.size_of(incoming)
        return queue.nbytes

    def _scan_small(self, can_evict: CanEvict) -> Key | None:
        small, skipped, found = self._small, [], None
        while small:
            key = small.oldest()
            if not can_evict(key):
                skipped.append(small.pop_oldest())
            elif self._freq[key] > 0:
                self._freq[key] = 0
                self._main.push(key, small.pop(key))
            else:
                found = key
                break
        self._restore(small, skipped)
        return found

    def _scan_main(self, can_evict: CanEvict) -> Key | None:
        main, skipped, found = self._main, [], None
        while main:
            key = main.oldest()
            if not can_evict(key):
                skipped.append(main.pop_oldest())
            elif self._freq[key] > 0:
                self._freq[key] -= 1
                main.to_newest(key)
            else:
                found = key
                break
        self._restore(main, skipped)
        return found

    @staticmethod
    def _restore(queue: SizedQueue, skipped: list[tuple[Key, int]]) -> None:
        # Skipped entries were popped oldest-first; putting them back at the tail in the same
        # order leaves every remaining entry's relative order as it was.
        for key, nbytes in reversed(skipped):
            queue.push_oldest(key, nbytes)

    def queues(self) -> tuple[list[Key], list[Key], list[Key]]:
        """(S, M, G) keys, tail (oldest) first - for stats and tests."""
        return list(self._small), list(self._main), list(self._ghost)

    def queue_bytes(self) -> tuple[int, int, int]:
        """(S, M, G) bytes, G at recorded sizes - for stats and tests."""
        return self._small.nbytes, self._main.nbytes, self._ghost.nbytes
