"""The disk tier as kvplug uses it: files under disk_path (kvplug/tiers/disk.py), known to the
scheduler from memory.

DiskTier (registered as "disk"; configured by disk_path, disk_bytes, disk_write, disk_fsync,
disk_rescan_s, disk_codec; see kvplug/tiers/tier.py for the spec's methods):
    index(tp_size) -> DiskView       the units on disk as the scheduler knows them, never by a
                                     system call in its loop (see DiskView)
    store(layout, rank) -> DiskStore
    restore(store, layouts) -> Restored   the start-up scan of one rank's files (headers only;
                                     bad files removed and counted); the worker runs it
DiskView: the units planned into the tier and found at start-up, less those deleted or reported
lost; a background thread (every disk_rescan_s) adds the units other engines sharing the folder
write and drops the files they delete.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvplug.tiers.disk import DiskStore, ScanStats, parse_unit_name, scan_units
from kvplug.tiers.tier import HeldUnits, Restored, TierSpec, register_tier

logger = logging.getLogger("kvplug")

# Bytes charged per unit file on top of its payload: the header is a few hundred bytes to a few
# KiB (it lists every layer's block shape). Overcharging keeps disk_bytes a true bound.
HEADER_ALLOWANCE = 4096
# How long a unit we deleted is not taken back from a rescan that still sees its file: far longer
# than the worker's asynchronous delete takes, short enough that another engine's rewrite of the
# same unit is soon picked up.
DELETE_GRACE_S = 30.0
# A folder modified this recently is listed again even if its mtime looks unchanged (the clock
# that stamps it is coarse).
_RECENT_S = 2.0


@register_tier("disk")
class DiskTier(TierSpec):
    loads_async = True
    COUNTERS = {
        "write_bytes": "bytes written to disk files",
        "read_bytes": "bytes read from disk files",
        "corrupt": "disk files found corrupt, truncated or foreign and removed (by the start-up scan or on a read)",
        "write_errors": "failed disk writes (disk full, I/O error)",
    }
    unit_overhead = HEADER_ALLOWANCE

    def __init__(self, root: str, capacity_bytes: int, write_through: bool = True, fsync: bool = False,
                 rescan_s: float = 0.0, codec: str = "none"):
        self.root, self.capacity_bytes, self.write_through = Path(root), capacity_bytes, write_through
        self.fsync, self.rescan_s, self.codec = fsync, rescan_s, codec

    @classmethod
    def from_config(cls, tiers, options: Mapping[str, Any] | None) -> "DiskTier | None":
        if options is not None:
            raise ValueError("tiers.disk: the disk tier is configured by disk_path, disk_bytes, disk_write, "
                             "disk_fsync, disk_rescan_s and disk_codec")
        if not tiers.disk_path:
            return None
        return cls(tiers.disk_path, tiers.disk_bytes, tiers.disk_write == "through", tiers.disk_fsync,
                   tiers.disk_rescan_s, tiers.disk_codec)

    def index(self, tp_size: int) -> "DiskView":
        return DiskView(self.root, tp_size, self.rescan_s)

    def store(self, layout: str, rank: int, codec=None) -> DiskStore:
        return DiskStore(self.root, layout, rank=rank, fsync=self.fsync, codec=codec)

    def restore(self, store: DiskStore, layouts: Sequence[str]) -> Restored:
        scan = ScanStats()
        units = sorted(scan_units(store.root, layouts, rank=store.rank, stats=scan), key=lambda u: u.mtime)
        if scan.corrupt:
            logger.warning("kvplug: disk tier %s: removed %d corrupt/truncated unit files at start-up",
                           store.root, scan.corrupt)
        return Restored([u.key for u in units], [u.nbytes for u in units], [u.mtime for u in units], scan.corrupt)

    def counters(self, s: Mapping[str, int]) -> dict[str, int]:
        return {"write_bytes": s.get("bytes_written", 0), "read_bytes": s.get("bytes_read", 0),
                "corrupt": s.get("corrupt", 0), "write_errors": s.get("write_errors", 0)}


class DiskView(HeldUnits):
    """The scheduler's knowledge of the disk tier (see the module docstring). A unit counts as on
    disk once every tensor-parallel rank's file is there."""

    def __init__(self, root: Path, tp_size: int, rescan_s: float = 0.0, clock=time.monotonic):
        super().__init__()
        self.root, self.tp_size, self._clock = Path(root), tp_size, clock
        self._deleted: OrderedDict[bytes, float] = OrderedDict()  # key -> when we planned its delete
        self._seen: dict[str, tuple[int, set[bytes]]] = {}  # folder -> (its mtime, units seen there)
        self._stop = threading.Event()
        self._thread = None
        if rescan_s > 0:
            self._thread = threading.Thread(target=self._watch, args=(rescan_s,), name="kvplug-disk-rescan",
                                            daemon=True)
            self._thread.start()

    def noted(self, key: bytes, held: bool) -> None:
        super().noted(key, held)
        with self._lock:
            if held:
                self._deleted.pop(key, None)
            else:
                self._deleted[key] = self._clock()
                self._deleted.move_to_end(key)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- the background rescan ---------------------------------------------------------
    def _watch(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.rescan()
            except Exception as e:  # noqa: BLE001 - a failed pass is retried; lookups go on from memory
                logger.debug("kvplug: disk tier %s rescan failed: %s", self.root, e)

    def rescan(self) -> None:
        """One pass: list the folders that changed since the last pass; their new units are
        added, units seen there before whose files are gone are dropped."""
        try:
            folders = [d for d in os.scandir(self.root) if len(d.name) == 2 and d.is_dir(follow_symlinks=False)]
        except OSError:
            return
        now = time.time()
        for d in folders:
            mtime = d.stat(follow_symlinks=False).st_mtime_ns
            seen = self._seen.get(d.name)
            if seen is not None and seen[0] == mtime and now - mtime / 1e9 > _RECENT_S:
                continue
            units = self._units_in(d.path)
            before = seen[1] if seen is not None else set()
            self._seen[d.name] = (mtime, units)
            self._apply(units - before, before - units)

    def _units_in(self, folder: str) -> set[bytes]:
        ranks: dict[bytes, int] = {}
        for e in os.scandir(folder):
            parsed = parse_unit_name(e.name)
            if parsed is not None and parsed[1] < self.tp_size:
                ranks[parsed[0]] = ranks.get(parsed[0], 0) + 1
        return {k for k, n in ranks.items() if n == self.tp_size}

    def _apply(self, added: set[bytes], gone: set[bytes]) -> None:
        now = self._clock()
        with self._lock:
            while self._deleted and now - next(iter(self._deleted.values())) > DELETE_GRACE_S:
                self._deleted.popitem(last=False)
            self._held.update(k for k in added if k not in self._deleted)
            self._held.difference_update(gone)
