"""Scheduler-side tier manager: where each cached unit lives, what to evict, what to move.

It holds keys, sizes and slot numbers, never tensors (it runs in vLLM's scheduler). Tiers:
CPU rows (slots), a disk directory (bytes), and optionally a remote store (capacity and
expiry are the store's own). The worker carries out the moves planned here, in this order
within one engine step:
    1. demotions (CPU slot -> disk) and disk deletions are queued, before any slot is reused
    2. loads: disk/remote -> GPU block (and into a CPU slot when promoted), then CPU -> GPU
    3. the forward pass
    4. saves: GPU block -> CPU slot (and -> disk / remote when written through)
Every key touched in the current step is pinned until end_step(), so nothing this step
still reads or writes is evicted or deleted under it.

Methods:
    lookup(keys)                   the tier of each leading cached key; no side effects on the index
    plan_loads(keys, costs, ns)    Loads for keys lookup() found; counts hits, may promote to CPU
    plan_saves(keys, costs, ns)    Saves for new units (already-cached keys are skipped); may evict
    end_step()                     the demotions and deletions planned this step; unpins
    forget(key)                    drop every copy of a unit the worker could not read
    restore_disk_index(keys)       account units found on disk at start-up
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
    slot: int  # cpu: the source slot; disk/remote: the CPU slot it is promoted into, or -1


@dataclass(frozen=True)
class Save:
    key: bytes
    cpu_slot: int  # -1 when the CPU tier cannot hold it
    to_disk: bool
    to_remote: bool = False


@dataclass
class StepOps:
    # (key, cpu slot): write the slot's unit to disk; (key, -1): delete the key's file. In the order
    # planned, which deletes an evicted unit before writing the unit that displaced it, so the disk
    # never holds more than disk_bytes plus the one file being written.
    disk_ops: list[tuple[bytes, int]] = field(default_factory=list)

    @property
    def demotes(self) -> list[tuple[bytes, int]]:
        return [(key, slot) for key, slot in self.disk_ops if slot >= 0]

    @property
    def disk_deletes(self) -> list[bytes]:
        return [key for key, slot in self.disk_ops if slot < 0]


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
    save_skips: int = 0  # full blocks already cached, not written again

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
        # On disk a unit also has a header (and one file per tensor-parallel rank): the caller
        # says what a unit costs there, so that disk_bytes bounds the real directory size.
        disk_unit = disk_unit_bytes or unit_bytes
        self.disk_enabled = disk_probe is not None and disk_bytes >= disk_unit
        self.write_through = disk_write == "through"
        self._probe, self._remote_probe = disk_probe, remote_probe
        self._slots: dict[bytes, int] = {}
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self.ttls = {ns: q.ttl_s for ns, q in quotas.items() if q.ttl_s}
        self._cpu = TierIndex(self.num_slots * unit_bytes, unit_bytes, policy,
                              {ns: q.cpu_bytes for ns, q in quotas.items() if q.cpu_bytes is not None},
                              self.ttls, clock)
        self._disk = TierIndex(disk_bytes if self.disk_enabled else 0, disk_unit, policy,
                               {ns: q.disk_bytes for ns, q in quotas.items() if q.disk_bytes is not None},
                               self.ttls, clock)
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
            if self._cpu.expired(key) or self._disk.expired(key):
                break
            if key in self._slots:
                tiers.append(CPU)
            elif self._on_disk(key):
                tiers.append(DISK)
            else:
                break
        rest = keys[len(tiers) :]
        if rest and self._remote_probe is not None:
            for found in self._remote_probe(rest):
                if not found:
                    break
                tiers.append(REMOTE)
        return tiers

    def _on_disk(self, key: bytes) -> bool:
        # The file system is the truth (another engine may have written or deleted the unit),
        # except for a unit we have just deleted ourselves.
        return self.disk_enabled and not self._recently_deleted(key) and self._probe(key) is not None

    def _recently_deleted(self, key: bytes) -> bool:
        now = self._clock()
        while self._deleted and now - next(iter(self._deleted.values())) > _DELETE_GRACE_S:
            self._deleted.popitem(last=False)
        return key in self._deleted

    def _present(self, key: bytes, ns: str) -> bool:
        """Whether a save of `key` would be redundant; syncs the disk index with the files."""
        if self._cpu.expired(key) or self._disk.expired(key):
            if key in self._disk:
                self._ops.disk_ops.append((key, -1))
            self.forget(key)  # past its tenant's TTL: drop it and save it afresh
            return False
        if key in self._slots:
            return True
        if not self.disk_enabled:
            return False
        if self._recently_deleted(key) or self._probe(key) is None:
            self.forget(key)  # deleted by us or another engine, or removed as corrupt
            return False
        return self._admit_disk(key, ns, 1.0)

    # ---- plans ---------------------------------------------------------------------------
    def plan_loads(self, keys: Sequence[bytes], tiers: Sequence[str], costs: Sequence[float], ns: str = "") -> list[Load]:
        """Loads for keys that lookup() placed in `tiers` (one entry per key)."""
        loads = []
        # Pin all first: admitting one unit into a full tier must not evict the next one.
        self._pinned.update(keys)
        for key, tier, cost in zip(keys, tiers, costs, strict=True):
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
                if self._admit_disk(key, ns, cost):
                    self._disk.touch(key)
                self.counters.disk_hits += 1
            else:
                self.counters.remote_hits += 1
            loads.append(Load(key, tier, self._allocate_slot(key, ns, cost)))
        return loads

    def plan_saves(self, keys: Sequence[bytes], costs: Sequence[float], ns: str = "", to_remote: bool = False) -> list[Save]:
        saves = []
        for key, cost in zip(keys, costs, strict=True):
            if key in self._pinned or self._present(key, ns):
                self.counters.save_skips += 1
                continue
            self._pinned.add(key)
            slot = self._allocate_slot(key, ns, cost)
            to_disk = self.disk_enabled and (self.write_through or slot < 0) and self._admit_disk(key, ns, cost)
            if slot < 0 and not to_disk and not to_remote:
                self._pinned.discard(key)
                continue
            self.counters.saves += 1
            saves.append(Save(key, slot, to_disk, to_remote))
        return saves

    def end_step(self) -> StepOps:
        ops, self._ops = self._ops, StepOps()
        self._pinned.clear()
        return ops

    def forget(self, key: bytes) -> None:
        """Drop every copy of `key` from the index (the worker found it unreadable)."""
        if self._cpu.remove(key):
            self._free_slots.append(self._slots.pop(key))
        self._disk.remove(key)

    def restore_disk_index(self, keys: Sequence[bytes]) -> int:
        """Index units found on disk at start-up, oldest first; returns how many were kept.
        Past disk_bytes the oldest are deleted (queued for the first step)."""
        return sum(self._admit_disk(key, "", 1.0) for key in keys)

    # ---- tiers ---------------------------------------------------------------------------
    def _allocate_slot(self, key: bytes, ns: str, cost: float) -> int:
        """A CPU slot for `key` (now indexed there), or -1 if the CPU tier cannot take it."""
        if self.num_slots == 0:
            return -1
        if key in self._slots:
            return self._slots[key]
        admitted, evicted = self._cpu.admit(key, ns, cost, self._pinned)
        for victim, victim_ns in evicted:
            slot = self._slots.pop(victim)
            self._free_slots.append(slot)
            self.counters.cpu_evictions += 1
            if self.disk_enabled and victim not in self._disk and self._admit_disk(victim, victim_ns, 1.0):
                self._ops.disk_ops.append((victim, slot))
        if not admitted:
            return -1
        slot = self._free_slots.pop()
        self._slots[key] = slot
        return slot

    def _admit_disk(self, key: bytes, ns: str, cost: float) -> bool:
        """Account `key` in the disk tier (ours, another engine's or a past run's unit)."""
        if not self.disk_enabled:
            return False
        admitted, evicted = self._disk.admit(key, ns, cost, self._pinned)
        for victim, _ in evicted:
            self._ops.disk_ops.append((victim, -1))
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
        return len(self._slots)

    def used_by(self, ns: str) -> tuple[int, int]:
        """(CPU bytes, disk bytes) held by namespace `ns`."""
        return self._cpu.used_by(ns), self._disk.used_by(ns)
