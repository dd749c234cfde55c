"""Scheduler-side tier manager: where each cached unit lives, what to evict, what to move.

It holds keys, sizes and slot numbers, never tensors (it runs in vLLM's scheduler), and asks no
file system: each tier answers from its scheduler-side view (kvplug/tiers/tier.py). Tiers: CPU
rows (slots), then the configured tiers in lookup order (SlowTier: disk, remote, any registered
one). A tier with a capacity is accounted here (eviction policy, tenant quotas, TTLs; its
evictions are planned deletes); one without manages its own (the remote store). A unit is a
prefix block (one row, `unit_bytes`) or a blend chunk (its payload bytes, in as many rows as it
needs); both kinds share every tier. The worker carries out the moves planned here, in this
order within one engine step:
    1. tier ops (a CPU slot written to a tier before the slot is reused; deletes), in plan order
    2. loads: tier -> GPU block (and into a CPU slot when promoted), then CPU -> GPU
    3. the forward pass
    4. saves: GPU block -> CPU slot (and -> the tiers it is written through to)
Every key touched in the current step is pinned until end_step(), so nothing this step
still reads or writes is evicted or deleted under it.

Methods (`nbytes`: per key, the unit's payload bytes of one rank; omitted for prefix blocks):
    lookup(keys)                   the tier of each leading cached key; no side effects
    lookup_each(keys)              the tier of every key, or None (chunks: each looked up on its own)
    plan_loads(keys, tiers, costs, ns, nbytes, promote)  Loads for keys lookup() found; counts hits, may promote
    plan_saves(keys, costs, ns, nbytes)  Saves for new units (cached keys are skipped); may evict
    end_step()                     the tier ops planned this step; unpins
    forget(key)                    drop every copy of a unit the worker could not read
    lost(tier, keys)               the worker found these gone from one tier
    restore(tier, keys, sizes)     account units the workers found at start-up (oldest first)
    counters                       hit/eviction counters since the last counters.take()
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvplug.tiers.index import TierIndex
from kvplug.tiers.tier import CPU, TierIndexView


@dataclass
class SlowTier:
    """What the manager needs of one configured tier (TierSpec + its scheduler-side view)."""
    name: str
    view: TierIndexView
    capacity_bytes: int | None = None  # accounted here; None: the store's own
    write_through: bool = True  # every save; False: only units the CPU tier evicts
    unit_overhead: int = 0  # bytes per unit and rank beyond its payload
    # payload bytes of one rank -> bytes the tier stores for them (a KV codec shrinks them); None: as they are
    payload_size: Callable[[int], int] | None = None

    @classmethod
    def of(cls, spec, view: TierIndexView, payload_size: Callable[[int], int] | None = None) -> "SlowTier":
        return cls(spec.name, view, spec.capacity_bytes, spec.write_through, spec.unit_overhead, payload_size)


@dataclass(frozen=True)
class Load:
    key: bytes
    tier: str  # where the unit comes from: "cpu" or a tier's name
    slots: tuple[int, ...]  # cpu: the source rows; other tiers: the CPU rows it is promoted into, or ()

    @property
    def slot(self) -> int:
        """The first row, or -1 (a prefix block has one row)."""
        return self.slots[0] if self.slots else -1


@dataclass(frozen=True)
class Save:
    key: bytes
    slots: tuple[int, ...]  # CPU rows, () when the CPU tier cannot hold it
    tiers: tuple[str, ...] = ()  # the other tiers it is written to

    @property
    def cpu_slot(self) -> int:
        return self.slots[0] if self.slots else -1


@dataclass
class StepOps:
    # (tier, key, rows): write the unit held in those CPU rows to the tier; rows (): delete it there.
    # In the order planned, which deletes an evicted unit before writing the unit that displaced
    # it, so a tier never holds more than its capacity plus the one unit being written.
    ops: list[tuple[str, bytes, tuple[int, ...]]] = field(default_factory=list)

    def demotes(self, tier: str) -> list[tuple[bytes, tuple[int, ...]]]:
        return [(key, rows) for t, key, rows in self.ops if t == tier and rows]

    def deletes(self, tier: str) -> list[bytes]:
        return [key for t, key, rows in self.ops if t == tier and not rows]


class PlanCounters:
    """What the plans decided, per tier: <tier>_hits, <tier>_evictions, and saves / save_skips
    (units already cached, not written again). Scheduler thread only, so no lock."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def take(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


@dataclass(frozen=True)
class Quota:
    bytes: Mapping[str, int] = field(default_factory=dict)  # tier name ("cpu" too) -> byte cap
    ttl_s: float | None = None  # units of the namespace older than this are not served


def cpu_rows(cpu_bytes: int, unit_bytes: int, tp_size: int) -> int:
    """Rows of the CPU tier on each rank: cpu_bytes, as every tier's capacity, counts all
    tensor-parallel ranks together, and each rank holds a row of its own shard per unit."""
    return cpu_bytes // (unit_bytes * tp_size)


class TierManager:
    def __init__(self, *, unit_bytes: int, cpu_bytes: int, tiers: Sequence[SlowTier] = (), tp_size: int = 1,
                 policy: str = "lru", quotas: Mapping[str, Quota] | None = None, clock=time.monotonic):
        if unit_bytes <= 0:
            raise ValueError(f"unit_bytes={unit_bytes}: must be > 0")
        quotas = quotas or {}
        self.unit_bytes, self.tp_size = unit_bytes, tp_size
        self.num_slots = cpu_rows(cpu_bytes, unit_bytes, tp_size)
        self.tiers = {t.name: t for t in tiers}
        self._slots: dict[bytes, tuple[int, ...]] = {}
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self.ttls = {ns: q.ttl_s for ns, q in quotas.items() if q.ttl_s}

        def index(name: str, capacity: int, unit: int) -> TierIndex:
            per = tp_size if name == CPU else 1  # the CPU index counts one rank's rows
            caps = {ns: q.bytes[name] // per for ns, q in quotas.items() if q.bytes.get(name) is not None}
            return TierIndex(capacity, unit, policy, caps, self.ttls, clock)
        # CPU accounting is by whole rows, so a unit admitted there always finds its rows free.
        self._cpu = index(CPU, self.num_slots * unit_bytes, unit_bytes)
        # Accounted tiers: a unit smaller than the tier's own overhead never fits, so none is disabled here.
        self._acct = {t.name: index(t.name, t.capacity_bytes, self._stored(t, unit_bytes)) for t in tiers
                      if t.capacity_bytes is not None and t.capacity_bytes >= self._stored(t, unit_bytes)}
        self._payload: dict[bytes, int] = {}  # payload bytes of the CPU-resident units that are not blocks
        self._pinned: set[bytes] = set()
        self._ops = StepOps()
        self.counters = PlanCounters()

    def _stored(self, t: SlowTier, nbytes: int) -> int:
        """Bytes a unit of this payload takes in tier t, all ranks."""
        stored = t.payload_size(nbytes) if t.payload_size is not None else nbytes
        return (stored + t.unit_overhead) * self.tp_size

    def _usable(self) -> list[SlowTier]:
        """Tiers that may hold units: every tier but an accounted one too small for a block."""
        return [t for t in self.tiers.values() if t.capacity_bytes is None or t.name in self._acct]

    # ---- queries -------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        """The tier of each of the leading keys that are cached (each tier asked once, in a
        batch, for the keys the tiers before it do not hold)."""
        out = []
        for tier in self._each(keys):
            if tier is None:
                break
            out.append(tier)
        return out

    def lookup_each(self, keys: Sequence[bytes]) -> list[str | None]:
        """The tier of every key (None: not cached), each tier asked once for what the tiers
        before it do not hold."""
        return self._each(keys)

    def _each(self, keys: Sequence[bytes]) -> list[str | None]:
        out: list[str | None] = [None] * len(keys)
        dead = [self._expired(k) for k in keys]
        for i, key in enumerate(keys):
            if not dead[i] and key in self._slots:
                out[i] = CPU
        for t in self._usable():
            ask = [i for i, tier in enumerate(out) if tier is None and not dead[i]]
            if not ask:
                break
            for i, held in zip(ask, t.view.contains_many([keys[i] for i in ask])):
                if held:
                    out[i] = t.name
        return out

    def _expired(self, key: bytes) -> bool:
        return self._cpu.expired(key) or any(a.expired(key) for a in self._acct.values())

    def _present(self, key: bytes, ns: str, nbytes: int) -> bool:
        """Whether a save of `key` would be redundant (in CPU, or in an accounted tier, now
        accounted by us if it was another engine's or a past run's)."""
        if self._expired(key):
            for name, acct in self._acct.items():
                if key in acct:
                    self._plan_delete(name, key)
            self.forget(key)  # past its tenant's TTL: drop it and save it afresh
            return False
        if key in self._slots:
            return True
        for name, acct in self._acct.items():
            if self.tiers[name].view.contains_many([key])[0]:
                return self._admit(name, key, ns, 1.0, nbytes)
            acct.remove(key)  # gone (deleted by another engine, or found corrupt)
        return False

    # ---- plans ---------------------------------------------------------------------------
    def plan_loads(self, keys: Sequence[bytes], tiers: Sequence[str], costs: Sequence[float], ns: str = "",
                   nbytes: Sequence[int] | None = None, promote: bool = True) -> list[Load]:
        """Loads for keys that lookup() placed in `tiers` (one entry per key). promote: units from
        other tiers also get CPU rows (an asynchronous load does not: its rows could be reused
        before it lands)."""
        loads = []
        sizes = nbytes if nbytes is not None else [self.unit_bytes] * len(keys)
        # Pin all first: admitting one unit into a full tier must not evict the next one.
        self._pinned.update(keys)
        for key, tier, cost, size in zip(keys, tiers, costs, sizes, strict=True):
            if key in self._slots:  # also a unit promoted earlier in this same plan
                self._cpu.touch(key)
                self.counters.add("cpu_hits")
                loads.append(Load(key, CPU, self._slots[key]))
                continue
            if tier == CPU:
                # Evicted since lookup: a copy in an accounted tier, if any, serves; else the
                # load fails and vLLM recomputes.
                tier = next((n for n, a in self._acct.items() if key in a), next(iter(self.tiers), CPU))
            if tier in self._acct:
                # Not admitted when the tier is full of this step's pinned units: the unit is
                # still read, it just stays out of our accounting.
                if self._admit(tier, key, ns, cost, size):
                    self._acct[tier].touch(key)
            self.counters.add(f"{tier}_hits")
            loads.append(Load(key, tier, self._allocate_slots(key, ns, cost, size) if promote else ()))
        return loads

    def plan_saves(self, keys: Sequence[bytes], costs: Sequence[float], ns: str = "",
                   nbytes: Sequence[int] | None = None) -> list[Save]:
        saves = []
        sizes = nbytes if nbytes is not None else [self.unit_bytes] * len(keys)
        for key, cost, size in zip(keys, costs, sizes, strict=True):
            if key in self._pinned or self._present(key, ns, size):
                self.counters.add("save_skips")
                continue
            self._pinned.add(key)
            slots = self._allocate_slots(key, ns, cost, size)
            to = tuple(t.name for t in self._usable() if (t.write_through or not slots)
                       and (t.name not in self._acct or self._admit(t.name, key, ns, cost, size)))
            if not slots and not to:
                self._pinned.discard(key)
                continue
            for name in to:
                self.tiers[name].view.noted(key, True)
            self.counters.add("saves")
            saves.append(Save(key, slots, to))
        return saves

    def end_step(self) -> StepOps:
        ops, self._ops = self._ops, StepOps()
        self._pinned.clear()
        return ops

    def forget(self, key: bytes) -> None:
        """Drop every copy of `key` from the index (the worker found it unreadable)."""
        if self._cpu.remove(key):
            self._release_rows(key)
        for name in self._acct:
            self.lost(name, [key])

    def lost(self, tier: str, keys: Sequence[bytes]) -> None:
        """The worker found `keys` gone from `tier` (a write failed or was dropped, a bad unit)."""
        if tier in self.tiers:
            self.tiers[tier].view.lost(keys)
        if tier in self._acct:
            for key in keys:
                self._acct[tier].remove(key)

    def restore(self, tier: str, keys: Sequence[bytes], sizes: Sequence[int] | None = None) -> int:
        """Account units the workers found in `tier` at start-up, oldest first (`sizes`: their
        stored bytes, all ranks); returns how many were admitted. Past the tier's capacity the
        oldest are deleted (queued for the first step)."""
        if tier not in self.tiers:
            return 0
        self.tiers[tier].view.restored(keys)
        if tier not in self._acct:
            return len(keys)
        sizes = sizes if sizes is not None else [self._stored(self.tiers[tier], self.unit_bytes)] * len(keys)
        return sum(self._admit(tier, key, "", 1.0, stored=size) for key, size in zip(keys, sizes, strict=True))

    # ---- tiers ---------------------------------------------------------------------------
    def _rows_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.unit_bytes))

    def _allocate_slots(self, key: bytes, ns: str, cost: float, nbytes: int) -> tuple[int, ...]:
        """CPU rows for `key` (now indexed there), or () if the CPU tier cannot take it."""
        if self.num_slots == 0:
            return ()
        if key in self._slots:
            return self._slots[key]
        n = self._rows_for(nbytes)
        admitted, evicted = self._cpu.admit(key, ns, cost, self._pinned, n * self.unit_bytes)
        for victim, victim_ns in evicted:
            self._demote(victim, victim_ns)
        if not admitted:
            return ()
        rows = tuple(self._free_slots.pop() for _ in range(n))
        self._slots[key] = rows
        if nbytes != self.unit_bytes:
            self._payload[key] = nbytes
        return rows

    def _demote(self, victim: bytes, ns: str) -> None:
        """A unit the CPU tier evicts: written from its rows to each accounted tier that does
        not hold it yet and to each tier written only on eviction."""
        rows = self._release_rows(victim)
        self.counters.add("cpu_evictions")
        size = self._payload.pop(victim, self.unit_bytes)
        for t in self._usable():
            if t.name in self._acct:
                if victim in self._acct[t.name] or not self._admit(t.name, victim, ns, 1.0, size):
                    continue
            elif t.write_through:
                continue
            self._ops.ops.append((t.name, victim, rows))
            t.view.noted(victim, True)

    def _release_rows(self, key: bytes) -> tuple[int, ...]:
        rows = self._slots.pop(key)
        self._free_slots.extend(reversed(rows))
        return rows

    def _admit(self, tier: str, key: bytes, ns: str, cost: float, nbytes: int = 0, stored: int | None = None) -> bool:
        """Account `key` in an accounted tier (ours, another engine's or a past run's unit):
        `nbytes` its payload, or `stored` its bytes in the tier."""
        size = stored if stored is not None else self._stored(self.tiers[tier], nbytes)
        admitted, evicted = self._acct[tier].admit(key, ns, cost, self._pinned, size)
        for victim, _ in evicted:
            self._plan_delete(tier, victim)
        self.counters.add(f"{tier}_evictions", len(evicted))
        return admitted

    def _plan_delete(self, tier: str, key: bytes) -> None:
        self._ops.ops.append((tier, key, ()))
        self.tiers[tier].view.noted(key, False)

    # ---- reports -------------------------------------------------------------------------
    def used(self, tier: str) -> int:
        """Bytes accounted in an accounted tier."""
        return self._acct[tier].used if tier in self._acct else 0

    @property
    def cpu_used_slots(self) -> int:
        return sum(len(rows) for rows in self._slots.values())

    def used_by(self, ns: str) -> dict[str, int]:
        """Bytes held by namespace `ns`, per accounted tier (cpu included)."""
        return {CPU: self._cpu.used_by(ns), **{name: a.used_by(ns) for name, a in self._acct.items()}}
