"""kvplug's tiers under SGLang's host pool: a disk tier (accounted by a TierIndex with the configured
eviction policy, quotas and TTLs) and an optional remote tier (Redis protocol), both built from their
tier specs (kvplug/tiers/tier.py) as the vLLM connector's worker builds them, and the disk's index
restored by the same spec.restore (this engine's layout and rank only).

SGLang's host pool is the CPU tier (L2); this is L3. Every unit is one page of one layout. Reads try
the disk first and the remote tier for what the disk lacks (one round trip each); a remote hit is
written to disk, so the next read is local. Writes go to both, asynchronously. Nothing here raises
for a missing, corrupt or foreign unit or a network problem: that is a miss.

PageStore(cfg: BackendConfig, rank) methods:
    bind(unit_layout, page_nbytes)   once the host pool is known: the tag and size of every unit;
                                     accounts the units of that tag already on disk (restart)
    lookup(keys) -> list[bool]       held or not, per key (expired units are misses)
    get_many(keys) -> list[Tensor | None]   payloads of page_nbytes, or None
    put_many(keys, payloads) -> list[bool]  queue writes; True where a tier accepted the page
    clear() -> None                  remove this tag's units from both tiers
    take_stats() -> dict             counters since the previous call
    flush() / close()                wait for queued writes / stop the writers
"""
from __future__ import annotations

import logging
import threading
from collections import Counter

import torch

from kvplug.sglang.config import BackendConfig
from kvplug.tiers.disk_format import KEY_BYTES, encode_header
from kvplug.tiers.index import TierIndex
from kvplug.tiers.tier import Unit, configured_tiers

logger = logging.getLogger("kvplug")

_UNBOUND = "sglang-unbound"  # the stores' default layout; every call names the bound one
# Writes are queued, but a store drops a put past its pending-bytes cap (256 MiB for Redis) without
# telling the caller, and SGLang's backup thread can queue pages faster than they are written. So
# past this many queued bytes put_many waits for the writers, as SGLang's own file backend always does.
WRITE_BEHIND_BYTES = 128 << 20


class PageStore:
    def __init__(self, cfg: BackendConfig, rank: int):
        self.cfg, self.rank, self.namespace = cfg, rank, cfg.namespace
        quota = cfg.kvplug.namespaces.get(cfg.namespace)
        self.ttl_s = quota.ttl_s if quota is not None else None
        self.layout: str | None = None
        self.page_nbytes = 0
        self.index: TierIndex | None = None
        self.counts: Counter = Counter()
        self._unflushed = 0  # bytes queued since the last flush
        self._lock = threading.Lock()  # the index: SGLang calls from its prefetch, I/O and backup threads
        self._count_lock = threading.Lock()
        self.specs = {s.name: s for s in configured_tiers(cfg.kvplug.tiers)}  # disk and/or remote
        self.stores = {name: spec.store(_UNBOUND, rank) for name, spec in self.specs.items()}
        # The disk is L3 (accounted here), the remote store behind it: their roles are SGLang's.
        self.disk, self.remote = self.stores.get("disk"), self.stores.get("remote")

    # ---- set-up ------------------------------------------------------------------------------

    def bind(self, unit_layout: str, page_nbytes: int) -> None:
        self.layout, self.page_nbytes = unit_layout, page_nbytes
        if self.disk is not None:
            self.index = self._new_index()
            self._restore_index()

    def _new_index(self) -> TierIndex:
        # Every unit of one layout has the same file size: header (fixed-width fields) + page.
        unit_bytes = len(encode_header(bytes(KEY_BYTES), self.layout, self.page_nbytes, "0" * 8)) + self.page_nbytes
        q = self.cfg.kvplug.namespaces
        return TierIndex(self.cfg.kvplug.tiers.disk_bytes, unit_bytes, self.cfg.kvplug.tiers.eviction_policy,
                         {ns: v.disk_bytes for ns, v in q.items() if v.disk_bytes is not None},
                         {ns: v.ttl_s for ns, v in q.items() if v.ttl_s})

    def _restore_index(self) -> None:
        """Account the units a past run (or another engine of this tag) left, oldest first; past
        disk_bytes or the quota the oldest are deleted. Their TTL counts from now."""
        found = self.specs["disk"].restore(self.disk, [self.layout])
        deletes = []
        for key in found.keys:
            admitted, evicted = self.index.admit(key, self.namespace, 1.0, ())
            deletes += [k for k, _ in evicted] + ([] if admitted else [key])
        self.disk.delete_many(deletes)
        self.count(restored=len(found.keys) - len(deletes), evicted=len(deletes))

    # ---- reads -------------------------------------------------------------------------------

    def lookup(self, keys: list[bytes]) -> list[bool]:
        if self.layout is None:
            return [False] * len(keys)
        found = [False] * len(keys)
        if self.disk is not None:
            live = self._live(keys)
            for i, held in enumerate(self.disk.lookup(keys)):
                found[i] = held and live[i]
        if self.remote is not None:
            ask = [i for i, f in enumerate(found) if not f]
            for i, held in zip(ask, self.remote.lookup([keys[i] for i in ask])):
                found[i] = held
        return found

    def get_many(self, keys: list[bytes]) -> list[torch.Tensor | None]:
        if self.layout is None:
            return [None] * len(keys)
        out: list[torch.Tensor | None] = [None] * len(keys)
        if self.disk is not None:
            live = [i for i, ok in enumerate(self._live(keys)) if ok]
            got = self.disk.get_many([keys[i] for i in live], self.layout)
            for i, t in zip(live, got):
                out[i] = t if t is not None and t.numel() == self.page_nbytes else None
            self._account_disk_reads(keys, live, out)
        if self.remote is not None:
            ask = [i for i, t in enumerate(out) if t is None]
            promote = []
            for i, t in zip(ask, self.remote.get_many([keys[i] for i in ask], self.layout)):
                if t is not None and t.numel() == self.page_nbytes:
                    out[i] = t
                    promote.append(i)
            self.count(remote_hits=len(promote))
            if self.disk is not None and promote:
                self._put_disk([keys[i] for i in promote], [out[i] for i in promote])
                self._write_behind(len(promote) * self.page_nbytes)
                self.count(promoted=len(promote))
        self.count(gets=len(keys), hits=sum(t is not None for t in out))
        return out

    def _live(self, keys: list[bytes]) -> list[bool]:
        """False for units past their namespace's TTL; their files are deleted."""
        with self._lock:
            dead = [k for k in keys if k in self.index and self.index.expired(k)]
            for k in dead:
                self.index.remove(k)
        if dead:
            self.disk.delete_many(dead)
            self.count(expired=len(dead))
        dead_set = set(dead)
        return [k not in dead_set for k in keys]

    def _account_disk_reads(self, keys, live, out) -> None:
        with self._lock:
            for i in live:
                k = keys[i]
                if out[i] is None:
                    self.index.remove(k)  # gone (another engine evicted it) or corrupt: not ours to count
                elif k in self.index:
                    self.index.touch(k)
                else:  # another engine's unit: shared from now on, so it counts against our budget
                    self._admit_locked([k], [out[i]])
        self.count(disk_hits=sum(out[i] is not None for i in live))

    # ---- writes ------------------------------------------------------------------------------

    def put_many(self, keys: list[bytes], payloads: list[torch.Tensor]) -> list[bool]:
        if self.layout is None:
            return [False] * len(keys)
        ok: list[bool] = []
        for lo, hi in _byte_chunks(payloads, WRITE_BEHIND_BYTES):
            ok += self._put_chunk(keys[lo:hi], payloads[lo:hi])
            self._write_behind(sum(p.numel() for p in payloads[lo:hi]))
        self.count(puts=len(keys), stored=sum(ok))
        return ok

    def _put_chunk(self, keys: list[bytes], payloads: list[torch.Tensor]) -> list[bool]:
        ok = [False] * len(keys)
        if self.disk is not None:
            ok = self._put_disk(keys, payloads)
        if self.remote is not None:
            held = self.remote.lookup(keys)
            todo = [i for i, h in enumerate(held) if not h]
            self.remote.put_many([Unit(keys[i], payloads[i], self.layout, self.ttl_s) for i in todo])
            accepted = self.remote.breaker.allow()  # an open breaker drops the writes
            ok = [o or h or accepted for o, h in zip(ok, held)]
        return ok

    def _write_behind(self, nbytes: int) -> None:
        with self._count_lock:
            self._unflushed += nbytes
            full = self._unflushed >= WRITE_BEHIND_BYTES
            if full:
                self._unflushed = 0
        if full:
            self.flush()
            self.count(write_waits=1)

    def _put_disk(self, keys: list[bytes], payloads: list[torch.Tensor]) -> list[bool]:
        # A unit already on disk (ours, or another engine's on a shared folder) is accounted, not
        # rewritten; one we account whose file is gone (another engine evicted it) is written again.
        on_disk = self.disk.lookup(keys)
        with self._lock:
            todo = [(k, p, held) for k, p, held in zip(keys, payloads, on_disk) if not (held and k in self.index)]
            for k, held in zip(keys, on_disk):
                if held and k in self.index:
                    self.index.touch(k)
            self._admit_locked([k for k, _, _ in todo], [p for _, p, _ in todo],
                               write={k for k, _, held in todo if not held})
            return [k in self.index for k in keys]

    def _admit_locked(self, keys, payloads, write=frozenset()) -> set[bytes]:
        """Account units in the index (evicting by the policy and quota) and queue the writes of
        those in `write`. Deletes of victims are queued before the writes that displace them, so
        the folder holds at most disk_bytes plus what is being written."""
        pinned = set(keys)
        deletes, units, admitted = [], [], set()
        for k, p in zip(keys, payloads):
            ok, evicted = self.index.admit(k, self.namespace, 1.0, pinned)
            deletes += [v for v, _ in evicted]
            if ok:
                admitted.add(k)
                if k in write:
                    units.append(Unit(k, p, self.layout))
        self.count(evicted=len(deletes), disk_full=len(keys) - len(admitted))
        self.disk.delete_many(deletes)
        self.disk.put_many(units)
        return admitted

    # ---- housekeeping ------------------------------------------------------------------------

    def clear(self) -> None:
        if self.layout is None:
            return
        if self.disk is not None:
            self.disk.flush()
            keys = self.specs["disk"].restore(self.disk, [self.layout]).keys
            self.disk.delete_many(keys)
            self.disk.flush()
            with self._lock:
                self.index = self._new_index()
        if self.remote is not None:
            self.remote.flush()
            from kvplug.sglang.remote_clear import clear_remote  # redis-py, only with a remote tier
            t = self.cfg.kvplug.tiers
            clear_remote(t.remote_url, t.remote_namespace, self.rank, self.layout, t.remote_timeout_ms / 1000.0)

    def count(self, **deltas: int) -> None:
        """Add to this store's counters (thread-safe)."""
        with self._count_lock:
            self.counts.update(deltas)

    def take_stats(self) -> dict[str, int]:
        with self._count_lock:
            out, self.counts = dict(self.counts), Counter()
        for name, tier in self.stores.items():
            out.update({f"{name}_{k}": v for k, v in tier.take_stats().items()})
        if self.index is not None:
            out.update(disk_units=len(self.index), disk_used_bytes=self.index.used)
        return out

    def flush(self) -> None:
        for tier in self.stores.values():
            tier.flush()

    def close(self) -> None:
        for tier in self.stores.values():
            tier.close()


def _byte_chunks(payloads: list[torch.Tensor], limit: int):
    """(lo, hi) ranges of consecutive payloads of at most `limit` bytes each (at least one payload)."""
    lo, size = 0, 0
    for i, p in enumerate(payloads):
        if i > lo and size + p.numel() > limit:
            yield lo, i
            lo, size = i, 0
        size += p.numel()
    if lo < len(payloads):
        yield lo, len(payloads)
