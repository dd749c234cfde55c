"""Scheduler-side tier manager: where each cached unit lives, what to evict, what to move.

It holds keys, sizes and slot numbers, never tensors (it runs in vLLM's scheduler). The
worker carries out the moves it plans, in this order within one engine step:
    1. demotions (CPU slot -> disk) and disk deletions are queued, before any slot is reused
    2. loads: disk -> GPU block (and into a CPU slot when promoted), then CPU slot -> GPU block
    3. the forward pass
    4. saves: GPU block -> CPU slot (and -> disk when written through)
Every key touched in the current step is pinned until end_step(), so nothing this step
still reads or writes is evicted or deleted under it.

Methods:
    lookup(keys)               how many leading keys are cached, per tier; no side effects
    restore_disk_index(keys)   account units found on disk at start-up
    plan_loads(keys)           Loads for keys lookup() found; counts hits, may promote to CPU
    plan_saves(keys, costs)    Saves for new units (already-cached keys are skipped); may evict
    end_step()                 the demotions and deletions planned this step; unpins
    forget(key)                drop every copy of a unit the worker could not read
    counters                   hit/miss/eviction counters since the last take_counters()
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvplug.tiers.policies import make_policy

DiskProbe = Callable[[bytes], "int | None"]


@dataclass(frozen=True)
class Load:
    key: bytes
    cpu_slot: int  # source slot, or -1 when the unit comes from disk
    promote_slot: int = -1  # disk loads only: also copy the unit into this CPU slot


@dataclass(frozen=True)
class Save:
    key: bytes
    cpu_slot: int  # -1 when there is no CPU tier
    to_disk: bool


@dataclass
class StepOps:
    demotes: list[tuple[bytes, int]] = field(default_factory=list)  # (key, cpu slot) -> disk
    disk_deletes: list[bytes] = field(default_factory=list)


@dataclass
class Counters:
    cpu_hits: int = 0
    disk_hits: int = 0
    cpu_evictions: int = 0
    disk_evictions: int = 0
    saves: int = 0
    save_skips: int = 0  # full blocks already cached, not written again

    def take(self) -> dict[str, int]:
        out = dataclasses.asdict(self)
        for k in out:
            setattr(self, k, 0)
        return out


class TierManager:
    def __init__(
        self,
        *,
        unit_bytes: int,
        cpu_bytes: int,
        disk_bytes: int = 0,
        policy: str = "lru",
        disk_write: str = "through",
        disk_probe: DiskProbe | None = None,
    ):
        if unit_bytes <= 0:
            raise ValueError(f"unit_bytes={unit_bytes}: must be > 0")
        self.unit_bytes = unit_bytes
        self.num_slots = cpu_bytes // unit_bytes
        self.disk_enabled = disk_probe is not None and disk_bytes >= unit_bytes
        self.disk_bytes = disk_bytes
        self.write_through = disk_write == "through"
        self._probe = disk_probe
        self._cpu: dict[bytes, int] = {}  # key -> slot
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._cpu_policy = make_policy(policy, self.num_slots * unit_bytes)
        self._disk: dict[bytes, int] = {}  # key -> bytes accounted
        self._disk_used = 0
        self._disk_policy = make_policy(policy, max(disk_bytes, 1))
        self._pinned: set[bytes] = set()
        self._ops = StepOps()
        self.counters = Counters()

    # ---- queries -------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """(n_cpu, n_disk): the first n_cpu + n_disk keys are all cached, each in CPU or disk."""
        n_cpu = n_disk = 0
        for key in keys:
            if key in self._cpu:
                n_cpu += 1
            elif self._on_disk(key):
                n_disk += 1
            else:
                break
        return n_cpu, n_disk

    def _on_disk(self, key: bytes) -> bool:
        # The file system is the truth: another engine may have written or deleted it.
        return self.disk_enabled and self._probe(key) is not None

    def _present(self, key: bytes) -> bool:
        """Whether a save of `key` would be redundant; syncs the disk index with the files."""
        if key in self._cpu:
            return True
        if not self.disk_enabled:
            return False
        if self._probe(key) is None:
            self.forget(key)  # deleted by another engine, or removed as corrupt
            return False
        return self._admit_disk(key, 1.0)

    # ---- plans ---------------------------------------------------------------------------
    def plan_loads(self, keys: Sequence[bytes], costs: Sequence[float] | None = None) -> list[Load]:
        loads = []
        for i, key in enumerate(keys):
            self._pinned.add(key)
            if key in self._cpu:
                self._cpu_policy.touch(key)
                self.counters.cpu_hits += 1
                loads.append(Load(key, self._cpu[key]))
                continue
            self._admit_disk(key, cost=costs[i] if costs else 1.0)
            self._disk_policy.touch(key)
            self.counters.disk_hits += 1
            slot = self._allocate_slot(key, cost=costs[i] if costs else 1.0)
            loads.append(Load(key, -1, slot))
        return loads

    def plan_saves(self, keys: Sequence[bytes], costs: Sequence[float] | None = None) -> list[Save]:
        saves = []
        for i, key in enumerate(keys):
            if key in self._pinned or self._present(key):
                self.counters.save_skips += 1
                continue
            cost = costs[i] if costs else 1.0
            self._pinned.add(key)
            slot = self._allocate_slot(key, cost)
            to_disk = self.disk_enabled and (self.write_through or slot < 0)
            if to_disk and not self._admit_disk(key, cost):
                to_disk = False
            if slot < 0 and not to_disk:
                self._pinned.discard(key)
                continue
            self.counters.saves += 1
            saves.append(Save(key, slot, to_disk))
        return saves

    def end_step(self) -> StepOps:
        ops, self._ops = self._ops, StepOps()
        self._pinned.clear()
        return ops

    def forget(self, key: bytes) -> None:
        """Drop every copy of `key` from the index (the worker found it unreadable)."""
        slot = self._cpu.pop(key, None)
        if slot is not None:
            self._cpu_policy.remove(key, evicted=False)
            self._free_slots.append(slot)
        if key in self._disk:
            self._disk_used -= self._disk.pop(key)
            self._disk_policy.remove(key, evicted=False)

    # ---- CPU tier ------------------------------------------------------------------------
    def _allocate_slot(self, key: bytes, cost: float) -> int:
        """A CPU slot for `key` (now indexed there), or -1 if the CPU tier cannot take it."""
        if self.num_slots == 0:
            return -1
        if not self._free_slots and not self._evict_cpu():
            return -1
        slot = self._free_slots.pop()
        self._cpu[key] = slot
        self._cpu_policy.insert(key, self.unit_bytes, cost)
        return slot

    def _evict_cpu(self) -> bool:
        victim = self._cpu_policy.victim(lambda k: k not in self._pinned)
        if victim is None:
            return False
        self._cpu_policy.remove(victim, evicted=True)
        slot = self._cpu.pop(victim)
        self.counters.cpu_evictions += 1
        if self.disk_enabled and victim not in self._disk and self._admit_disk(victim, 1.0):
            self._ops.demotes.append((victim, slot))
        self._free_slots.append(slot)
        return True

    # ---- disk tier -----------------------------------------------------------------------
    def _admit_disk(self, key: bytes, cost: float) -> bool:
        """Account `key` in the disk tier (ours, another engine's or a past run's unit)."""
        if key in self._disk:
            return True
        if not self._make_disk_room(self.unit_bytes):
            return False
        self._disk[key] = self.unit_bytes
        self._disk_used += self.unit_bytes
        self._disk_policy.insert(key, self.unit_bytes, cost)
        return True

    def _make_disk_room(self, nbytes: int) -> bool:
        while self._disk_used + nbytes > self.disk_bytes:
            victim = self._disk_policy.victim(lambda k: k not in self._pinned)
            if victim is None:
                return False
            self._disk_policy.remove(victim, evicted=True)
            self._disk_used -= self._disk.pop(victim)
            self._ops.disk_deletes.append(victim)
            self.counters.disk_evictions += 1
        return True

    def restore_disk_index(self, keys: Sequence[bytes]) -> int:
        """Index units found on disk at start-up, oldest first; returns how many were kept.
        Past disk_bytes the oldest are deleted (queued for the first step)."""
        return sum(self._admit_disk(key, 1.0) for key in keys)

    @property
    def disk_used(self) -> int:
        return self._disk_used

    @property
    def cpu_used_slots(self) -> int:
        return len(self._cpu)
