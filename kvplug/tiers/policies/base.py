"""Eviction policy interface for one tier, plus the two containers the policies share.

EvictionPolicy methods:
    insert(key, nbytes, cost)   a new entry entered the tier (key not present)
    touch(key)                  the entry was hit (read) - key present
    remove(key, evicted)        the entry left the tier; evicted=True when the policy's victim was
                                taken (ghost lists learn from this), False for deletions/moves
    victim(can_evict)           the key to evict next among entries with can_evict(key) True, or None;
                                does not remove it, but may reorder internal queues
    __contains__(key)           whether key is resident
    __len__()                   number of resident entries
    resident_bytes              sum of the resident entries' sizes

Contract with the tier manager (all policies):
  * Either order of calls works. Evict-first: while the new entry would not fit, victim() then
    remove(victim, evicted=True), then insert(). Insert-first: insert(), then while the tier is
    over capacity, victim() and remove(). The papers' algorithms make room *before* admitting,
    so in insert-first order - recognised by the resident bytes exceeding capacity_bytes - the
    entry named by the latest insert() is "incoming": it is left out of the policy's order and
    offered as a victim only when no other evictable entry is left (it alone is too large, or
    everything else is pinned); the manager should then drop it - it never fit.
  * The policy never holds data and never evicts on its own; it only names victims.
  * touch()/remove() of an absent key raise KeyError; insert() of a present key, a size that is
    not a positive int, or a cost that is not a finite number >= 0 raise ValueError.

SizedQueue methods:
    push(key, nbytes)       append at the newest end (key absent)
    push_oldest(key, nbytes)  put back at the oldest end (undoing pop_oldest)
    pop(key) -> nbytes      take key out wherever it is
    pop_oldest() -> (key, nbytes)
    oldest()                the key at the oldest end (queue not empty)
    to_newest(key)          move a present key to the newest end
    size_of(key)            the recorded size of a present key
    nbytes, __contains__, __len__, __iter__ (oldest first)

LazyMinHeap methods:
    set(key, prio)      give key a (new) priority; its older heap entries go stale
    discard(key)        forget key (its heap entries go stale)
    first(accept)       the key with the smallest priority among accept(key) True, or None
"""

from __future__ import annotations

import heapq
import math
import numbers
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, Hashable

Key = Hashable
CanEvict = Callable[[Key], bool]


def _is_int(value: object) -> bool:
    # numpy ints count (sizes may come from array maths); bools are a config mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def fmt_key(key: Key) -> str:
    """Short printable form of a key for error messages (digests are long)."""
    if isinstance(key, (bytes, bytearray)):
        text = bytes(key).hex()
        return text if len(text) <= 16 else text[:16] + "..."
    return repr(key)


class EvictionPolicy(ABC):
    """Orders one tier's entries for eviction (see the module docstring for the contract).

    Subclasses implement _insert/_touch/_remove/_victim; this class validates arguments,
    tracks resident sizes (so __contains__/__len__ are shared) and applies the incoming rule.
    """

    def __init__(self, capacity_bytes: int):
        if not _is_int(capacity_bytes) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes={capacity_bytes!r}: allowed values are ints >= 0")
        self.capacity_bytes = int(capacity_bytes)
        self._sizes: dict[Key, int] = {}  # resident key -> nbytes; the single source of membership
        self._resident_bytes = 0  # invariant: == sum(self._sizes.values())
        self._last_insert: Key | None = None  # latest insert, until removed or superseded

    # --- public interface -------------------------------------------------------------------
    def insert(self, key: Key, nbytes: int, cost: float) -> None:
        if key in self._sizes:
            raise ValueError(f"insert: key {fmt_key(key)} is already present; allowed: keys not in the tier")
        if not _is_int(nbytes) or nbytes <= 0:
            raise ValueError(f"insert: nbytes={nbytes!r}: allowed values are ints > 0")
        if not _is_real(cost) or not math.isfinite(cost) or cost < 0:
            raise ValueError(f"insert: cost={cost!r}: allowed values are finite numbers >= 0")
        nbytes = int(nbytes)
        self._sizes[key] = nbytes
        self._resident_bytes += nbytes
        self._last_insert = key
        self._insert(key, nbytes, float(cost))

    def touch(self, key: Key) -> None:
        self._require(key, "touch")
        self._touch(key)

    def remove(self, key: Key, evicted: bool) -> None:
        self._require(key, "remove")
        self._remove(key, bool(evicted))
        self._resident_bytes -= self._sizes.pop(key)
        if key == self._last_insert:
            self._last_insert = None

    def victim(self, can_evict: CanEvict) -> Key | None:
        incoming = self._incoming
        if incoming is None:
            return self._victim(can_evict)
        pick = self._victim(lambda k: k != incoming and can_evict(k))
        if pick is None and can_evict(incoming):
            return incoming  # last resort: nothing else can go, the newcomer does not fit
        return pick

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    @property
    def _incoming(self) -> Key | None:
        """The entry being admitted in insert-first order (see the module docstring), else None."""
        if self._resident_bytes > self.capacity_bytes:
            return self._last_insert
        return None

    # --- subclass hooks (arguments already validated; _sizes holds key during all hooks) ----
    @abstractmethod
    def _insert(self, key: Key, nbytes: int, cost: float) -> None: ...

    @abstractmethod
    def _touch(self, key: Key) -> None: ...

    @abstractmethod
    def _remove(self, key: Key, evicted: bool) -> None: ...

    @abstractmethod
    def _victim(self, can_evict: CanEvict) -> Key | None: ...

    def _require(self, key: Key, op: str) -> None:
        if key not in self._sizes:
            raise KeyError(f"{op}: key {fmt_key(key)} is not in the tier")


class SizedQueue:
    """Keys in order, each with its byte size; nbytes is always the sum of the sizes held."""

    def __init__(self) -> None:
        self._items: OrderedDict[Key, int] = OrderedDict()  # first = oldest
        self.nbytes = 0

    def push(self, key: Key, nbytes: int) -> None:
        self._items[key] = nbytes
        self.nbytes += nbytes

    def push_oldest(self, key: Key, nbytes: int) -> None:
        self.push(key, nbytes)
        self._items.move_to_end(key, last=False)

    def pop(self, key: Key) -> int:
        nbytes = self._items.pop(key)
        self.nbytes -= nbytes
        return nbytes

    def pop_oldest(self) -> tuple[Key, int]:
        key, nbytes = self._items.popitem(last=False)
        self.nbytes -= nbytes
        return key, nbytes

    def oldest(self) -> Key:
        return next(iter(self._items))

    def to_newest(self, key: Key) -> None:
        self._items.move_to_end(key)

    def size_of(self, key: Key) -> int:
        return self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)


class LazyMinHeap:
    """Keys ordered by priority; updates push a new entry and leave the old one stale.

    Invariant: a heap entry (prio, key) is live iff self._prio.get(key) == prio. Priorities
    must be unique per set() call (callers append a sequence number), so a key is never
    compared and a stale entry can never look live.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Key]] = []
        self._prio: dict[Key, tuple] = {}

    def set(self, key: Key, prio: tuple) -> None:
        self._prio[key] = prio
        heapq.heappush(self._heap, (prio, key))
        self._maybe_compact()

    def discard(self, key: Key) -> None:
        self._prio.pop(key, None)
        self._maybe_compact()

    def first(self, accept: CanEvict) -> Key | None:
        heap, held, found = self._heap, [], None
        while heap:
            prio, key = heap[0]
            if self._prio.get(key) != prio:
                heapq.heappop(heap)  # stale: drop for good
            elif accept(key):
                found = key
                break
            else:
                held.append(heapq.heappop(heap))  # live but refused: put back below
        for item in held:
            heapq.heappush(heap, item)
        return found

    def _maybe_compact(self) -> None:
        # Touch-heavy traces would grow the heap without bound; rebuild once stale entries
        # outnumber live ones, which keeps every operation amortised O(log n).
        if len(self._heap) > 2 * len(self._prio) + 32:
            self._heap = [(p, k) for k, p in self._prio.items()]
            heapq.heapify(self._heap)
