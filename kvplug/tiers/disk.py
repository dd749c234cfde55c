"""Disk tier: one file per KV unit and tensor-parallel rank, written by a background thread.

Files live at root/<hex[:2]>/<hex>.r<rank>.kvp in the format of kvplug.tiers.disk_format. A
writer puts the bytes in a temp file in the same directory (name ending in ".tmp") and renames it
over the final name, so a reader sees either no file or a whole one, never a torn one. Several
DiskStores (engines, ranks) may share a root: they coordinate only through those atomic renames.

unit_path(root, key, rank) -> Path          where a unit's file lives
parse_unit_name(name) -> (key, rank) | None the key and rank a unit file's name gives
scan_units(root, layout=None, rank=None) -> iterator   UnitInfo of every good unit, by headers only
                                            (index rebuild; layout: one tag or a collection of tags)

DiskStore(root, layout, rank=0, on_error=logger, fsync=False, codec=None, ...) methods (registered as tier
"disk", spec in kvplug/tiers/disk_tier.py; `layout` is the default layout tag, a call may name another;
`codec`, a kvplug.tiers.codec.UnitCodec, compresses units in the writer thread and restores them on read:
callers see the same payloads either way):
    put(key, payload, layout=None)   enqueue an asynchronous write of a contiguous CPU uint8 tensor
    delete(key)          enqueue a delete, ordered after earlier puts of the same store
    get(key, layout=None)  the payload tensor, or None on a miss; corrupt files are removed, never raised
    get_many(keys, layout=None)  get() of each key, in order
    exists(key)          whether get would find the unit (queued ops first, then the file)
    lookup(keys) / put_many(units) / delete_many(keys) / take_lost() / take_stats()   the Tier
                         interface (take_lost: keys whose writes failed or were dropped, or whose
                         file was found bad, since the last call)
    flush()              block until every queued op is done
    close()              flush and stop the writer thread (also on leaving a `with` block)
    stats                a DiskStats; stats.take() returns and resets the counts since the last take
"""
from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator

import torch

from kvplug.tiers.counters import Counters
from kvplug.tiers.disk_format import (KEY_BYTES, CorruptUnit, Header, checksum, encode_header,
                                      read_header, verify)
from kvplug.tiers.tier import Unit
from kvplug.tiers.writer import PUT, AsyncWriter

logger = logging.getLogger("kvplug")

UNIT_SUFFIX = ".kvp"
TMP_SUFFIX = ".tmp"
_UNIT_NAME = re.compile(r"([0-9a-f]{64})\.r(0|[1-9][0-9]*)\.kvp")
_HEX = frozenset("0123456789abcdef")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def unit_path(root: Path, key: bytes, rank: int) -> Path:
    """root/<hex[:2]>/<hex>.r<rank>.kvp; the two-hex-digit fan-out keeps directories small."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {key!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    h = key.hex()
    return Path(root) / h[:2] / f"{h}.r{rank}{UNIT_SUFFIX}"


@dataclass
class DiskStats(Counters):
    """Counters of one DiskStore. Only add() and take() touch them, under the lock (two threads write).

    puts: put() calls; bytes_written: bytes of files written; write_errors: failed writes/deletes;
    dropped: puts not written (write back-off, max_pending_bytes, or a unit the codec cannot encode); gets/hits: get() calls and hits
    (in-flight hits included); bytes_read: file bytes read; corrupt: bad files found and removed;
    deletes: delete ops carried out.
    """
    puts: int = 0
    bytes_written: int = 0
    write_errors: int = 0
    dropped: int = 0
    gets: int = 0
    hits: int = 0
    bytes_read: int = 0
    corrupt: int = 0
    deletes: int = 0


@dataclass(frozen=True)
class UnitInfo:
    key: bytes
    rank: int
    nbytes: int  # size of the whole file (header + payload): what a disk byte budget counts
    mtime: float


@dataclass
class ScanStats:
    """What scan_units found besides good units; fill one by passing it as `stats`."""
    units: int = 0
    corrupt: int = 0  # removed: bad header, wrong size, or name that does not match the key
    tmp_removed: int = 0  # stale temp files of writers that were killed mid-write
    other_layout: int = 0  # skipped, left in place


class DiskStore:
    """Worker-side disk tier of one rank; see the module docstring for the methods."""

    def __init__(self, root, layout: str, rank: int = 0, on_error: logging.Logger = logger, *,
                 fsync: bool = False, backoff_s: float = 30.0, max_pending_bytes: int = 1 << 30, codec=None):
        if not isinstance(layout, str) or not layout:
            raise ValueError(f"layout must be a non-empty str, got {layout!r}")
        unit_path(Path("."), bytes(KEY_BYTES), rank)  # validates rank
        if backoff_s < 0 or max_pending_bytes < 0:
            raise ValueError(f"backoff_s={backoff_s!r} and max_pending_bytes={max_pending_bytes!r} "
                             "must be >= 0")
        self.root = _prepare_root(Path(root))
        self.layout, self.rank, self.fsync = layout, rank, fsync
        self.backoff_s = backoff_s
        self.codec = codec
        self.stats = DiskStats()
        self._log = on_error
        self._backoff_until = 0.0  # monotonic time before which writes are skipped
        self._failing = False  # a write failed and none succeeded since: log only the first
        self._lost: list[bytes] = []  # see take_lost; the writer thread adds to it too
        self._lost_lock = threading.Lock()
        # The op is looked up per call, so tests can wrap it.
        self._writes = AsyncWriter(f"kvplug-disk-r{rank}", lambda *op: self._carry_out(*op),
                                   max_pending_bytes, on_bug=lambda: self.stats.add(write_errors=1))

    # ---- caller side -------------------------------------------------------------------------

    def put(self, key: bytes, payload: torch.Tensor, layout: str | None = None) -> None:
        """Queue a write; `payload` is kept by reference, so the caller must not modify it again."""
        unit_path(self.root, key, self.rank)  # validates key
        if (not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8
                or payload.device.type != "cpu" or not payload.is_contiguous()):
            desc = (f"{payload.dtype} on {payload.device}, contiguous={payload.is_contiguous()}"
                    if isinstance(payload, torch.Tensor) else type(payload).__name__)
            raise ValueError(f"payload must be a contiguous CPU torch.uint8 tensor, got {desc}")
        self.stats.add(puts=1)
        self._check_open()
        if time.monotonic() < self._backoff_until or not self._writes.put(key, payload, layout or self.layout):
            self.stats.add(dropped=1)
            self._note_lost(key)

    def delete(self, key: bytes) -> None:
        unit_path(self.root, key, self.rank)
        self._check_open()
        self._writes.delete(key)

    def get(self, key: bytes, layout: str | None = None) -> torch.Tensor | None:
        """The payload (do not modify it), or None; never raises for a bad or missing file."""
        path = unit_path(self.root, key, self.rank)
        layout = layout or self.layout
        queued, tensor, queued_layout = self._writes.pending_with_arg(key)
        if queued:
            hit = tensor is not None and queued_layout == layout
            self.stats.add(gets=1, hits=int(hit))
            return tensor if hit else None
        out = self._read(path, key, layout)
        self.stats.add(gets=1, hits=int(out is not None))
        return out

    def get_many(self, keys, layout: str | None = None) -> list[torch.Tensor | None]:
        """get() of each key, in order (the remote store batches this; files need not)."""
        return [self.get(key, layout) for key in keys]

    # ---- the Tier interface (kvplug/tiers/tier.py) ---------------------------------------------

    def lookup(self, keys) -> list[bool]:
        return [self.exists(key) for key in keys]

    def put_many(self, units: list[Unit]) -> None:
        for u in units:
            self.put(u.key, u.payload, u.layout)

    def delete_many(self, keys) -> None:
        for key in keys:
            self.delete(key)

    def take_stats(self) -> dict[str, int]:
        return {k: v for k, v in vars(self.stats.take()).items() if not k.startswith("_")}

    def take_lost(self) -> list[bytes]:
        with self._lost_lock:
            lost, self._lost = self._lost, []
        return lost

    def _note_lost(self, key: bytes) -> None:
        with self._lost_lock:
            self._lost.append(key)

    def exists(self, key: bytes) -> bool:
        path = unit_path(self.root, key, self.rank)
        queued, tensor = self._writes.pending(key)
        return tensor is not None if queued else path.exists()

    def flush(self) -> None:
        self._writes.flush()

    def close(self) -> None:
        self._writes.close()

    def __enter__(self) -> "DiskStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._writes.closed:
            raise RuntimeError(f"DiskStore at {self.root} is closed")

    # ---- reads -------------------------------------------------------------------------------

    def _read(self, path: Path, key: bytes, layout: str) -> torch.Tensor | None:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.debug("kvplug disk tier: cannot open %s: %s", path, e)
            return None
        with f:
            st = None
            try:
                st = os.fstat(f.fileno())
                header = read_header(f)
                _check_unit(header, key, self.codec.stored_layout(layout) if self.codec else layout, st.st_size)
                out = torch.empty(header.nbytes, dtype=torch.uint8)
                _readinto_exact(f, out.numpy())
                verify(header, out.numpy())
                if self.codec is not None:
                    out = self.codec.decode(out, layout)
            except CorruptUnit as e:
                self.stats.add(corrupt=1)
                self._note_lost(key)
                logger.debug("kvplug disk tier: removing corrupt unit %s: %s", path, e.reason)
                _remove_if_same(path, st)
                return None
            except OSError as e:  # I/O error, maybe transient: a miss, but leave the file
                logger.debug("kvplug disk tier: cannot read %s: %s", path, e)
                return None
        self.stats.add(bytes_read=st.st_size)
        return out

    # ---- writer thread -----------------------------------------------------------------------

    def _carry_out(self, kind: str, key: bytes, tensor: torch.Tensor | None, layout) -> None:
        if kind == PUT:
            self._do_put(key, tensor, layout)
        else:
            self._do_delete(key)

    def _do_put(self, key: bytes, tensor: torch.Tensor, layout: str) -> None:
        if time.monotonic() < self._backoff_until:
            self.stats.add(dropped=1)
            self._note_lost(key)
            return
        try:
            n = self._write_unit(key, tensor, layout)
        except OSError as e:
            self._write_failed(e)
            self._note_lost(key)
            return
        self._failing = False
        self.stats.add(bytes_written=n)

    def _write_unit(self, key: bytes, tensor: torch.Tensor, layout: str) -> int:
        if self.codec is not None:
            encoded = self.codec.encode(tensor, layout)
            if encoded is None:
                self.stats.add(dropped=1)
                return 0
            tensor, layout = encoded, self.codec.stored_layout(layout)
        path = unit_path(self.root, key, self.rank)
        data = tensor.reshape(-1).numpy()  # zero-copy view of the caller's contiguous tensor
        head = encode_header(key, layout, data.nbytes, checksum(data))
        path.parent.mkdir(exist_ok=True)
        # Unique per process and call: two engines writing the same key never share a temp file.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        try:
            with open(tmp, "xb") as f:
                f.write(head)
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        if self.fsync:
            _fsync_dir(path.parent)
        return len(head) + data.nbytes

    def _write_failed(self, e: OSError) -> None:
        self.stats.add(write_errors=1)
        self._backoff_until = time.monotonic() + self.backoff_s
        if self._failing:
            return
        self._failing = True
        what = "disk full" if e.errno in _DISK_FULL else "write failed"
        self._log.warning("kvplug disk tier %s: %s (%s); skipping writes for %.0f s, reads go on",
                          self.root, what, e, self.backoff_s)

    def _do_delete(self, key: bytes) -> None:
        try:
            unit_path(self.root, key, self.rank).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            self.stats.add(write_errors=1)
            logger.debug("kvplug disk tier: cannot delete %s: %s", key.hex(), e)
            return
        self.stats.add(deletes=1)


def _prepare_root(root: Path) -> Path:
    """Create root and prove it writable, with errors that name the path."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"disk tier root {root} exists and is not a directory") from None
    except OSError as e:
        raise OSError(e.errno, f"cannot create disk tier root {root}: {e.strerror}") from e
    probe = root / f".probe.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"disk tier root {root} is not writable: {e.strerror}") from e
    return root


def _check_unit(header: Header, key: bytes, layout: str, file_size: int) -> None:
    if header.key != key:
        raise CorruptUnit(f"file holds key {header.key.hex()}, expected {key.hex()}")
    if header.layout != layout:
        raise CorruptUnit(f"file has layout {header.layout!r}, expected {layout!r}")
    if file_size != header.file_bytes:
        raise CorruptUnit(f"file is {file_size} bytes, header says {header.file_bytes}")


def _readinto_exact(f, buf) -> None:
    mv, got = memoryview(buf).cast("B"), 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            raise CorruptUnit(f"truncated payload: {got} of {len(mv)} bytes")
        got += n


def _remove_if_same(path: Path, st: os.stat_result | None) -> None:
    """Unlink path unless another writer has meanwhile renamed a new file over it."""
    try:
        if st is not None:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return
        path.unlink()
    except OSError:
        pass


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_unit_name(name: str) -> tuple[bytes, int] | None:
    """(key, rank) of a unit file's name, or None if it is not one."""
    m = _UNIT_NAME.fullmatch(name)
    return None if m is None else (bytes.fromhex(m.group(1)), int(m.group(2)))


def scan_units(root, layout: str | Collection[str] | None = None, *, rank: int | None = None,
               stats: ScanStats | None = None, tmp_max_age_s: float = 600.0) -> Iterator[UnitInfo]:
    """Yield every good unit under root, reading headers only.

    Removes files with bad headers, a wrong size, or a name that does not match the key inside, and
    temp files older than tmp_max_age_s (younger ones may belong to a live writer). With `layout` (a
    tag or a collection of them), units of other layouts are skipped but kept (another model or
    engine may own them); with `rank`, other ranks' files are not opened.
    """
    stats = stats if stats is not None else ScanStats()
    layouts = None if layout is None else ({layout} if isinstance(layout, str) else set(layout))
    now = time.time()
    try:
        subdirs = [d for d in os.scandir(root) if len(d.name) == 2 and set(d.name) <= _HEX
                   and d.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for d in subdirs:
        try:
            entries = list(os.scandir(d.path))
        except OSError:
            continue
        for e in entries:
            info = _scan_entry(d.name, e, layouts, rank, now, tmp_max_age_s, stats)
            if info is not None:
                stats.units += 1
                yield info


def _scan_entry(subdir: str, e: os.DirEntry, layouts: set[str] | None, rank: int | None, now: float,
                tmp_max_age_s: float, stats: ScanStats) -> UnitInfo | None:
    if e.name.endswith(TMP_SUFFIX):
        try:
            if now - e.stat(follow_symlinks=False).st_mtime > tmp_max_age_s:
                os.unlink(e.path)
                stats.tmp_removed += 1
        except OSError:
            pass
        return None
    if not e.name.endswith(UNIT_SUFFIX):
        return None  # not ours: leave it alone
    m = _UNIT_NAME.fullmatch(e.name)
    if m is not None and rank is not None and int(m.group(2)) != rank:
        return None  # another rank's file: that rank's scan judges it
    if m is None or m.group(1)[:2] != subdir:
        stats.corrupt += 1
        _unlink_quiet(Path(e.path))
        return None
    st = None
    try:
        with open(e.path, "rb") as f:
            st = os.fstat(f.fileno())
            header = read_header(f)
        if header.key.hex() != m.group(1) or st.st_size != header.file_bytes:
            raise CorruptUnit("name or size does not match the header")
    except CorruptUnit:
        stats.corrupt += 1
        _remove_if_same(Path(e.path), st)
        return None
    except OSError:  # deleted meanwhile by another engine, or unreadable: not ours to judge
        return None
    if layouts is not None and header.layout not in layouts:
        stats.other_layout += 1
        return None
    return UnitInfo(key=header.key, rank=int(m.group(2)), nbytes=st.st_size, mtime=st.st_mtime)
