"""Worker-side storage of chunk KV for blending: a CPU LRU by bytes over an optional disk tier.

A chunk's KV is kept in the canonical layout [layers, 2, tokens, kv_heads, head_dim] (index 1:
0 = keys, 1 = values) in the model dtype, with keys rotated as if the chunk started at position 0,
so the same chunk serves any position. Keys are kvplug.core.chunking.chunk_key digests.

ChunkStore(shape, dtype, cpu_bytes, disk_root, disk_bytes, layout, rank=0) methods:
    get(key)          the KV tensor (do not modify it), or None; CPU first, then disk (promoted to
                      CPU); never raises for a bad or foreign file
    put(key, kv)      validate, keep a CPU copy (LRU by bytes), write through to disk (LRU by bytes)
    flush()           block until queued disk writes and deletes are done
    close()           flush and stop the disk writer
    take_stats()      counters since the last take: cpu_hits, disk_hits, misses, puts,
                      cpu_evictions, disk_evictions, corrupt

Disk units are DiskStore files under disk_root (the caller passes <disk_path>/chunks) whose layout
string names the caller's layout, the dtype and the shape: a store never reshapes another model's
bytes, and scan_units leaves such units alone.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from kvplug.tiers.disk import DiskStore, scan_units, unit_path
from kvplug.tiers.disk_format import encode_header

logger = logging.getLogger("kvplug")

_STATS = ("cpu_hits", "disk_hits", "misses", "puts", "cpu_evictions", "disk_evictions", "corrupt")


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an int >= {minimum}")
    return value


class ChunkStore:
    """Chunk KV of one worker (one tensor-parallel rank); see the module docstring."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, cpu_bytes: int,
                 disk_root: Path | None, disk_bytes: int, layout: str, rank: int = 0):
        if not isinstance(shape, (tuple, list)) or len(shape) != 3:
            raise ValueError(f"shape={shape!r}: must be (layers, kv_heads, head_dim)")
        for name, v in zip(("layers", "kv_heads", "head_dim"), shape):
            _check_count(name, v, 1)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={dtype!r}: must be a torch.dtype")
        if not isinstance(layout, str) or not layout:
            raise ValueError(f"layout={layout!r}: must be a non-empty str")
        self.layers, self.kv_heads, self.head_dim = (int(v) for v in shape)
        self.dtype = dtype
        self.cpu_bytes = _check_count("cpu_bytes", cpu_bytes, 0)
        self.disk_bytes = _check_count("disk_bytes", disk_bytes, 0)
        self.token_bytes = 2 * self.layers * self.kv_heads * self.head_dim * dtype.itemsize
        self.disk_layout = (f"chunk|{layout}|{str(dtype).removeprefix('torch.')}"
                            f"|L{self.layers}H{self.kv_heads}D{self.head_dim}")
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(_STATS, 0)
        # Invariant: _cpu_total == sum of nbytes in _cpu <= cpu_bytes; order = least recent first.
        self._cpu: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._cpu_total = 0
        # Units of this rank believed on disk -> file size (header + payload); least recent first.
        self._disk_units: OrderedDict[bytes, int] = OrderedDict()
        self._disk_total = 0
        self._disk: DiskStore | None = None
        self._disk_corrupt = 0  # DiskStore's corrupt count already added to ours
        if disk_root is not None and self.disk_bytes > 0:
            self._disk = DiskStore(disk_root, self.disk_layout, rank=rank)
            self._restore_disk_index()

    # ---- public ------------------------------------------------------------------------------

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            kv = self._cpu.get(key)
            if kv is not None:
                self._cpu.move_to_end(key)
                self._stats["cpu_hits"] += 1
                return kv
        kv = self._disk_get(key)
        with self._lock:
            if kv is None:
                self._stats["misses"] += 1
                return None
            self._stats["disk_hits"] += 1
            self._cpu_insert(key, kv)
        return kv

    def put(self, key: bytes, kv: torch.Tensor) -> None:
        self._check_kv(kv)
        unit_path(Path("."), key, 0)  # validates the key (32 bytes) before anything is kept
        copy = torch.empty(kv.shape, dtype=self.dtype)
        copy.copy_(kv)  # our own contiguous CPU copy: the caller may reuse kv
        with self._lock:
            self._stats["puts"] += 1
            self._cpu_insert(key, copy)
        if self._disk is not None:
            self._disk_put(key, copy)

    def flush(self) -> None:
        if self._disk is not None:
            self._disk.flush()

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()

    def take_stats(self) -> dict[str, int]:
        with self._lock:
            out, self._stats = self._stats, dict.fromkeys(_STATS, 0)
        return out

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- CPU ---------------------------------------------------------------------------------

    def _check_kv(self, kv) -> None:
        want = (self.layers, 2, "tokens", self.kv_heads, self.head_dim)
        if not isinstance(kv, torch.Tensor):
            raise ValueError(f"kv must be a torch.Tensor of shape {want}, got {type(kv).__name__}")
        s = tuple(kv.shape)
        if (len(s) != 5 or s[0] != self.layers or s[1] != 2 or s[3] != self.kv_heads
                or s[4] != self.head_dim or s[2] < 1):
            raise ValueError(f"kv shape {s}: expected {want} with tokens >= 1")
        if kv.dtype != self.dtype:
            raise ValueError(f"kv dtype {kv.dtype} (shape {s}): expected {self.dtype}")

    def _cpu_insert(self, key: bytes, kv: torch.Tensor) -> None:
        """Keep kv as the newest CPU unit, evicting the least recent ones to fit (under the lock)."""
        old = self._cpu.pop(key, None)
        if old is not None:
            self._cpu_total -= old.nbytes
        if kv.nbytes > self.cpu_bytes:
            return  # would evict everything and still not fit
        while self._cpu_total + kv.nbytes > self.cpu_bytes:
            _, victim = self._cpu.popitem(last=False)
            self._cpu_total -= victim.nbytes
            self._stats["cpu_evictions"] += 1
        self._cpu[key] = kv
        self._cpu_total += kv.nbytes

    # ---- disk --------------------------------------------------------------------------------

    def _restore_disk_index(self) -> None:
        units = [u for u in scan_units(self._disk.root, self.disk_layout) if u.rank == self._disk.rank]
        for u in sorted(units, key=lambda u: u.mtime):
            self._disk_units[u.key] = u.nbytes
            self._disk_total += u.nbytes
        self._disk_evict(keep=None)  # the cap may have shrunk since the last run

    def _file_bytes(self, key: bytes, payload_nbytes: int) -> int:
        # The checksum is always 8 hex digits, so a placeholder gives the exact header length.
        return len(encode_header(key, self.disk_layout, payload_nbytes, "0" * 8)) + payload_nbytes

    def _disk_put(self, key: bytes, kv: torch.Tensor) -> None:
        with self._lock:
            if key in self._disk_units and self._disk.exists(key):
                self._disk_units.move_to_end(key)  # same key, same bytes: no rewrite
                return
            size = self._file_bytes(key, kv.nbytes)
            if size > self.disk_bytes:
                return
            self._disk_forget(key)
            self._disk_units[key] = size
            self._disk_total += size
            # Victims' deletes are queued before the write that displaces them, so the folder never
            # holds more than disk_bytes plus the one file being written.
            self._disk_evict(keep=key)
            # view(-1) first: a bf16 tensor reinterprets as uint8 only along a contiguous last dim.
            self._disk.put(key, kv.view(-1).view(torch.uint8))

    def _disk_evict(self, keep: bytes | None) -> None:
        """Delete least recent units until the disk total fits disk_bytes (under the lock)."""
        while self._disk_total > self.disk_bytes and self._disk_units:
            victim = next(iter(self._disk_units))
            if victim == keep and len(self._disk_units) == 1:
                break
            if victim == keep:
                self._disk_units.move_to_end(victim)
                continue
            self._disk_forget(victim)
            self._disk.delete(victim)
            self._stats["disk_evictions"] += 1

    def _disk_forget(self, key: bytes) -> None:
        size = self._disk_units.pop(key, None)
        if size is not None:
            self._disk_total -= size

    def _disk_get(self, key: bytes) -> torch.Tensor | None:
        if self._disk is None:
            return None
        payload = self._disk.get(key)  # checksums verified; corrupt files removed, counted there
        with self._lock:
            seen, self._disk_corrupt = self._disk_corrupt, self._disk.stats.corrupt
            self._stats["corrupt"] += self._disk_corrupt - seen
            if payload is None:
                self._disk_forget(key)
                return None
            n = payload.numel()
            if n == 0 or n % self.token_bytes:
                logger.debug("kvplug chunk store: unit %s has %d bytes, not a multiple of %d",
                             key.hex(), n, self.token_bytes)
                self._stats["corrupt"] += 1
                self._disk_forget(key)
                self._disk.delete(key)
                return None
            self._disk_touch(key, n)
        tokens = n // self.token_bytes
        return payload.view(self.dtype).view(self.layers, 2, tokens, self.kv_heads, self.head_dim)

    def _disk_touch(self, key: bytes, payload_nbytes: int) -> None:
        """Mark a disk hit as recently used; a unit another engine wrote joins the index."""
        if key in self._disk_units:
            self._disk_units.move_to_end(key)
            return
        try:
            size = os.stat(unit_path(self._disk.root, key, self._disk.rank)).st_size
        except OSError:
            size = self._file_bytes(key, payload_nbytes)
        self._disk_units[key] = size
        self._disk_total += size
        self._disk_evict(keep=key)
