"""Scheduler-side tier manager: where each cached unit lives, what to evict, what to move.

It holds keys, sizes and slot numbers, never tensors (it runs in vLLM's scheduler). Tiers:
CPU rows (slots), a disk directory (bytes), and optionally a remote store (capacity and
expiry are the store's own). A unit is a prefix block (one row, `unit_bytes`) or a blend
chunk (its payload bytes, in as many rows as it needs); both kinds share every tier, its
eviction policy, tenant quotas and TTLs. The worker carries out the moves planned here, in this order
within one engine step:
    1. demotions (CPU slot -> disk) and disk deletions are queued, before any slot is reused
    2. loads: disk/remote -> GPU block (and into a CPU slot when promoted), then CPU -> GPU
    3. the forward pass
    4. saves: GPU block -> CPU slot (and -> disk / remote when written through)
Every key touched in the current step is pinned until end_step(), so nothing this step
still reads or writes is evicted or deleted under it.

Methods (`nbytes`: per key, the unit's payload bytes; omitted for prefix blocks):
    lookup(keys)                   the tier of each leading cached key; no side effects on the index
    lookup_each(keys)              the tier of every key, or None (chunks: each looked up on its own)
    plan_loads(keys, tiers, costs, ns, nbytes, promote)  Loads for keys lookup() found; counts hits, may promote
    plan_saves(keys, costs, ns, to_remote, nbytes)  Saves for new units (cached keys are skipped); may evict
    (disk_size(nbytes), when given, is what a unit of nbytes payload bytes costs on disk: header, ranks, codec)
    end_step()                     the demotions and deletions planned this step; unpins
    forget(key)                    drop every copy of a unit the worker could not read
    restore_disk_index(keys, sizes)  account units found on disk at start-up
    counters                       hit/eviction counters since the last counters.take()
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvplug.tiers.index import TierIndex

DiskProbe = Callable[[bytes], "int | None"]
RemoteProbe = Callable[[Sequence[bytes]], Sequence[bool]]
CPU, DISK, REMOTE = "cpu", "disk", "remote"
# How long a unit we deleted is treated as gone even if its file is still seen: far longer
# than the worker's asynchronous delete takes, short enough that another engine's rewrite
# of the same unit is soon picked up.
_DELETE_GRACE_S = 30.0


@dataclass(frozen=True)
class Load:
    key: bytes
    tier: str  # where the unit comes from: cpu, disk or remote
    slots: tuple[int, ...]  # cpu: the source rows; disk/remote: the CPU rows it is promoted into, or ()

    @property
    def slot(self) -> int:
        """The first row, or -1 (a prefix block has one row)."""
        return self.slots[0] if self.slots else -1


@dataclass(frozen=True)
class Save:
    key: bytes
    slots: tuple[int, ...]  # CPU rows, () when the CPU tier cannot hold it
    to_disk: bool
    to_remote: bool = False

    @property
    def cpu_slot(self) -> int:
        return self.slots[0] if self.slots else -1


@dataclass
class StepOps:
    # (key, rows): write the unit held in those CPU rows to disk; (key, ()): delete the key's file.
    # In the order planned, which deletes an evicted unit before writing the unit that displaced
    # it, so the disk never holds more than disk_bytes plus the one file being written.
    disk_ops: list[tuple[bytes, tuple[int, ...]]] = field(default_factory=list)

    @property
    def demotes(self) -> list[tuple[bytes, tuple[int, ...]]]:
        return [(key, rows) for key, rows in self.disk_ops if rows]

    @property
    def disk_deletes(self) -> list[bytes]:
        return [key for key, rows in self.disk_ops if not rows]


@dataclass
class PlanCounters:
    """What the plans decided (scheduler thread only, so no lock; the stores' own counters are
    kvplug.tiers.counters.Counters, shared with their writer threads)."""
    cpu_hits: int = 0
    disk_hits: int = 0
    remote_hits: int = 0
    cpu_evictions: int = 0
    disk_evictions: int = 0
    saves: int = 0
    save_skips: int = 0  # units already cached, not written again

    def take(self) -> dict[str, int]:
        out = dataclasses.asdict(self)
        for k in out:
            setattr(self, k, 0)
        return out


@dataclass(frozen=True)
class Quota:
    cpu_bytes: int | None = None
    disk_bytes: int | None = None
    ttl_s: float | None = None  # units of the namespace older than this are not served


class TierManager:
    def __init__(
        self,
        *,
        unit_bytes: int,
        cpu_bytes: int,
        disk_unit_bytes: int | None = None,
        disk_size: Callable[[int], int] | None = None,
        disk_bytes: int = 0,
        policy: str = "lru",
        disk_write: str = "through",
        disk_probe: DiskProbe | None = None,
        remote_probe: RemoteProbe | None = None,
        quotas: Mapping[str, Quota] | None = None,
        clock=time.monotonic,
    ):
        if unit_bytes <= 0:
            raise ValueError(f"unit_bytes={unit_bytes}: must be > 0")
        quotas = quotas or {}
        self.unit_bytes = unit_bytes
        self.num_slots = cpu_bytes // unit_bytes
        # On disk a unit also has a header (and one file per tensor-parallel rank), and a KV codec may
        # shrink its payload: disk_size(payload bytes) says what a unit costs there. Without it, the
        # caller says what a prefix block costs (disk_unit_bytes), and a chunk costs its payload plus
        # the same overhead.
        disk_unit = disk_size(unit_bytes) if disk_size else (disk_unit_bytes or unit_bytes)
        self._disk_size_of = disk_size or (lambda n, extra=disk_unit - unit_bytes: n + extra)
        self.disk_enabled = disk_probe is not None and disk_bytes >= disk_unit
        self.write_through = disk_write == "through"
        self._probe, self._remote_probe = disk_probe, remote_probe
        self._slots: dict[bytes, tuple[int, ...]] = {}
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self.ttls = {ns: q.ttl_s for ns, q in quotas.items() if q.ttl_s}
        # CPU accounting is by whole rows, so a unit admitted there always finds its rows free.
        self._cpu = TierIndex(self.num_slots * unit_bytes, unit_bytes, policy,
                              {ns: q.cpu_bytes for ns, q in quotas.items() if q.cpu_bytes is not None},
                              self.ttls, clock)
        self._disk = TierIndex(disk_bytes if self.disk_enabled else 0, disk_unit, policy,
                               {ns: q.disk_bytes for ns, q in quotas.items() if q.disk_bytes is not None},
                               self.ttls, clock)
        self._payload: dict[bytes, int] = {}  # payload bytes of the CPU-resident units that are not blocks
        self._pinned: set[bytes] = set()
        self._ops = StepOps()
        self.counters = PlanCounters()
        # Units whose deletion we queued: the worker deletes asynchronously, and until it has,
        # the file is still there for the probe to find. key -> when the delete was planned.
        self._clock = clock
        self._deleted: OrderedDict[bytes, float] = OrderedDict()

    # ---- queries -------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        """The tier of each of the leading keys that are cached; the remote store is asked
        once, in a batch, for the keys after the local run."""
        tiers = []
        for key in keys:
            tier = self._local_tier(key)
            if tier is None:
                break
            tiers.append(tier)
        rest = keys[len(tiers) :]
        if rest and self._remote_probe is not None:
            for found in self._remote_probe(rest):
                if not found:
                    break
                tiers.append(REMOTE)
        return tiers

    def lookup_each(self, keys: Sequence[bytes]) -> list[str | None]:
        """The tier of every key (None: not cached): each key on its own, the remote store asked
        once for all the keys no local tier holds."""
        tiers = [self._local_tier(key) for key in keys]
        ask = [i for i, t in enumerate(tiers) if t is None]
        if ask and self._remote_probe is not None:
            for i, found in zip(ask, self._remote_probe([keys[i] for i in ask])):
                tiers[i] = REMOTE if found else None
        return tiers

    def _local_tier(self, key: bytes) -> str | None:
        if self._cpu.expired(key) or self._disk.expired(key):
            return None
        if key in self._slots:
            return CPU
        return DISK if self._on_disk(key) else None

    def _on_disk(self, key: bytes) -> bool:
        # The file system is the truth (another engine may have written or deleted the unit),
        # except for a unit we have just deleted ourselves.
        return self.disk_enabled and not self._recently_deleted(key) and self._probe(key) is not None

    def _recently_deleted(self, key: bytes) -> bool:
        now = self._clock()
        while self._deleted and now - next(iter(self._deleted.values())) > _DELETE_GRACE_S:
            self._deleted.popitem(last=False)
        return key in self._deleted

    def _present(self, key: bytes, ns: str, nbytes: int) -> bool:
        """Whether a save of `key` would be redundant; syncs the disk index with the files."""
        if self._cpu.expired(key) or self._disk.expired(key):
            if key in self._disk:
                self._ops.disk_ops.append((key, ()))
            self.forget(key)  # past its tenant's TTL: drop it and save it afresh
            return False
        if key in self._slots:
            return True
        if not self.disk_enabled:
            return False
        if self._recently_deleted(key) or self._probe(key) is None:
            self.forget(key)  # deleted by us or another engine, or removed as corrupt
            return False
        return self._admit_disk(key, ns, 1.0, self._disk_size(nbytes))

    # ---- plans ---------------------------------------------------------------------------
    def plan_loads(self, keys: Sequence[bytes], tiers: Sequence[str], costs: Sequence[float], ns: str = "",
                   nbytes: Sequence[int] | None = None, promote: bool = True) -> list[Load]:
        """Loads for keys that lookup() placed in `tiers` (one entry per key). promote: units from
        disk or remote also get CPU rows (an asynchronous load does not: its rows could be reused
        before it lands)."""
        loads = []
        sizes = nbytes if nbytes is not None else [self.unit_bytes] * len(keys)
        # Pin all first: admitting one unit into a full tier must not evict the next one.
        self._pinned.update(keys)
        for key, tier, cost, size in zip(keys, tiers, costs, sizes, strict=True):
            if key in self._slots:  # also a unit promoted earlier in this same plan
                self._cpu.touch(key)
                self.counters.cpu_hits += 1
                loads.append(Load(key, CPU, self._slots[key]))
                continue
            if tier == CPU:
                # Evicted since lookup: its disk copy, if any, serves; else the load fails
                # and vLLM recomputes.
                tier = DISK
            if tier == DISK:
                # Not admitted when the tier is full of this step's pinned units: the file is
                # still read, it just stays out of our accounting.
                if self._admit_disk(key, ns, cost, self._disk_size(size)):
                    self._disk.touch(key)
                self.counters.disk_hits += 1
            else:
                self.counters.remote_hits += 1
            loads.append(Load(key, tier, self._allocate_slots(key, ns, cost, size) if promote else ()))
        return loads

    def plan_saves(self, keys: Sequence[bytes], costs: Sequence[float], ns: str = "", to_remote: bool = False,
                   nbytes: Sequence[int] | None = None) -> list[Save]:
        saves = []
        sizes = nbytes if nbytes is not None else [self.unit_bytes] * len(keys)
        for key, cost, size in zip(keys, costs, sizes, strict=True):
            if key in self._pinned or self._present(key, ns, size):
                self.counters.save_skips += 1
                continue
            self._pinned.add(key)
            slots = self._allocate_slots(key, ns, cost, size)
            to_disk = self.disk_enabled and (self.write_through or not slots) and \
                self._admit_disk(key, ns, cost, self._disk_size(size))
            if not slots and not to_disk and not to_remote:
                self._pinned.discard(key)
                continue
            self.counters.saves += 1
            saves.append(Save(key, slots, to_disk, to_remote))
        return saves

    def end_step(self) -> StepOps:
        ops, self._ops = self._ops, StepOps()
        self._pinned.clear()
        return ops

    def forget(self, key: bytes) -> None:
        """Drop every copy of `key` from the index (the worker found it unreadable)."""
        if self._cpu.remove(key):
            self._release_rows(key)
        self._disk.remove(key)

    def restore_disk_index(self, keys: Sequence[bytes], sizes: Sequence[int] | None = None) -> int:
        """Index units found on disk at start-up, oldest first (`sizes`: their bytes on disk,
        all ranks); returns how many were kept. Past disk_bytes the oldest are deleted (queued
        for the first step)."""
        sizes = sizes if sizes is not None else [None] * len(keys)
        return sum(self._admit_disk(key, "", 1.0, size) for key, size in zip(keys, sizes, strict=True))

    # ---- tiers ---------------------------------------------------------------------------
    def _rows_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.unit_bytes))

    def _disk_size(self, nbytes: int) -> int | None:
        """Bytes a unit of this payload takes on disk (None: a prefix block, the default)."""
        return None if nbytes == self.unit_bytes else self._disk_size_of(nbytes)

    def _allocate_slots(self, key: bytes, ns: str, cost: float, nbytes: int) -> tuple[int, ...]:
        """CPU rows for `key` (now indexed there), or () if the CPU tier cannot take it."""
        if self.num_slots == 0:
            return ()
        if key in self._slots:
            return self._slots[key]
        n = self._rows_for(nbytes)
        admitted, evicted = self._cpu.admit(key, ns, cost, self._pinned, n * self.unit_bytes)
        for victim, victim_ns in evicted:
            rows = self._release_rows(victim)
            self.counters.cpu_evictions += 1
            size = self._disk_size(self._payload.pop(victim, self.unit_bytes))
            if self.disk_enabled and victim not in self._disk and self._admit_disk(victim, victim_ns, 1.0, size):
                self._ops.disk_ops.append((victim, rows))
        if not admitted:
            return ()
        rows = tuple(self._free_slots.pop() for _ in range(n))
        self._slots[key] = rows
        if nbytes != self.unit_bytes:
            self._payload[key] = nbytes
        return rows

    def _release_rows(self, key: bytes) -> tuple[int, ...]:
        rows = self._slots.pop(key)
        self._free_slots.extend(reversed(rows))
        return rows

    def _admit_disk(self, key: bytes, ns: str, cost: float, nbytes: int | None = None) -> bool:
        """Account `key` in the disk tier (ours, another engine's or a past run's unit)."""
        if not self.disk_enabled:
            return False
        admitted, evicted = self._disk.admit(key, ns, cost, self._pinned, nbytes)
        for victim, _ in evicted:
            self._ops.disk_ops.append((victim, ()))
            self._deleted[victim] = self._clock()
            self._deleted.move_to_end(victim)
        if admitted:
            self._deleted.pop(key, None)
        self.counters.disk_evictions += len(evicted)
        return admitted

    @property
    def disk_used(self) -> int:
        return self._disk.used

    @property
    def cpu_used_slots(self) -> int:
        return sum(len(rows) for rows in self._slots.values())

    def used_by(self, ns: str) -> tuple[int, int]:
        """(CPU bytes, disk bytes) held by namespace `ns`."""
        return self._cpu.used_by(ns), self._disk.used_by(ns)
