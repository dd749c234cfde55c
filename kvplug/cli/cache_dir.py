"""Read-only inspection and targeted clearing of a kvplug disk-tier directory.

    scan(root, verify=False) -> CacheSummary    what the directory holds; never modifies it
    plan_clear(root, tmp_age_s) -> ClearPlan    unit files, stale temp files, folders to remove
    apply_clear(plan) -> (removed, failed)      remove exactly what the plan lists
    count_units(root) -> int                    number of unit files (cheap, names only)
    count_tmp(root) -> int                      number of unit temp files (writes in progress)

Why not kvplug.tiers.disk.scan_units: it removes corrupt unit files and stale temp files as it
goes (that is its job at engine start-up), and `stats` must delete nothing. The checks here
are the same (name, header, size; payload CRC with verify=True) but only counted.
Only names the disk tier writes are ever touched: <2 hex>/<64 hex>.r<rank>.kvp, their temp
files, and the root's .probe temp files; everything else is counted as "other" and left alone.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvplug.cli.common import CliError
from kvplug.tiers.disk_format import CorruptUnit, read_header, verify
from kvplug.tiers.unit_kinds import KINDS, unit_kind

_SUBDIR = re.compile(r"[0-9a-f]{2}")
_UNIT = re.compile(r"([0-9a-f]{64})\.r(0|[1-9][0-9]*)\.kvp")
_UNIT_TMP = re.compile(r"[0-9a-f]{64}\.r[0-9]+\.kvp\.[0-9]+\.[0-9a-f]{12}\.tmp")
_PROBE_TMP = re.compile(r"\.probe\.[0-9]+\.[0-9a-f]{12}\.tmp")


@dataclass
class CacheSummary:
    path: str
    units: int = 0  # good unit files
    bytes: int = 0  # bytes of the good unit files
    layouts: dict[str, int] = field(default_factory=dict)  # layout fingerprint -> units
    # Per kind of unit (kvplug/tiers/unit_kinds.py: "block" vLLM prefix blocks, "chunk" blend
    # chunks, "sglang" SGLang pages; they share the folder): {"units": n, "bytes": b}, every kind listed.
    kinds: dict[str, dict[str, int]] = field(default_factory=lambda: {k: {"units": 0, "bytes": 0} for k in KINDS})
    ranks: dict[int, int] = field(default_factory=dict)  # tensor-parallel rank -> units
    oldest_mtime: float | None = None
    newest_mtime: float | None = None
    corrupt: int = 0  # unit files an engine would reject (and delete) on reading
    corrupt_files: list[str] = field(default_factory=list)
    unreadable: int = 0  # could not be opened (permissions, removed meanwhile)
    tmp_files: int = 0  # in-progress or abandoned writes
    other_files: int = 0  # not kvplug's


@dataclass
class ClearPlan:
    root: Path
    files: list[Path] = field(default_factory=list)  # unit files, then temp files
    dirs: list[Path] = field(default_factory=list)  # fan-out folders empty once files are gone
    unit_files: int = 0
    tmp_files: int = 0
    bytes: int = 0


def _open_root(root: Path) -> list[os.DirEntry]:
    if not root.exists():
        raise CliError(f"{root}: no such directory; give the disk_path an engine was started with")
    if not root.is_dir():
        raise CliError(f"{root} is not a directory; give the disk_path an engine was started with")
    try:
        return sorted(os.scandir(root), key=lambda e: e.name)
    except PermissionError:
        raise CliError(f"{root}: permission denied; run as the user that owns the cache") from None


def _subdirs(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return [e for e in entries if _SUBDIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]


def _children(d: os.DirEntry) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(d.path), key=lambda e: e.name)
    except OSError:
        return []


def _is_file(e: os.DirEntry) -> bool:
    return e.is_file(follow_symlinks=False)


def _require_kvplug(root: Path, entries: list[os.DirEntry], found_any: bool) -> None:
    """An empty folder is an empty cache; a non-empty one with nothing of ours is a mistake."""
    if entries and not found_any and not _subdirs(entries):
        raise CliError(f"{root} is not a kvplug cache directory (no <2 hex>/<64 hex>.r<rank>.kvp "
                       "files); give the disk_path an engine was started with")


def _check_unit(path: str, name_key: str, payload_too: bool) -> tuple[str, int, float]:
    """(layout, size, mtime) of a good unit; CorruptUnit if an engine would reject it."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        header = read_header(f)
        if header.key.hex() != name_key:
            raise CorruptUnit(f"file name says key {name_key[:12]}.., header {header.key.hex()[:12]}..")
        if st.st_size != header.file_bytes:
            raise CorruptUnit(f"file is {st.st_size} bytes, header says {header.file_bytes}")
        if payload_too:
            f.seek(header.payload_offset)
            verify(header, f.read(header.nbytes))
    return header.layout, st.st_size, st.st_mtime


def _add_unit(s: CacheSummary, layout: str, rank: int, size: int, mtime: float) -> None:
    s.units += 1
    s.bytes += size
    s.layouts[layout] = s.layouts.get(layout, 0) + 1
    kind = s.kinds[unit_kind(layout)]
    kind["units"] += 1
    kind["bytes"] += size
    s.ranks[rank] = s.ranks.get(rank, 0) + 1
    s.oldest_mtime = mtime if s.oldest_mtime is None else min(s.oldest_mtime, mtime)
    s.newest_mtime = mtime if s.newest_mtime is None else max(s.newest_mtime, mtime)


def _scan_file(s: CacheSummary, subdir: str, e: os.DirEntry, payload_too: bool) -> None:
    if _UNIT_TMP.fullmatch(e.name):
        s.tmp_files += 1
        return
    if not e.name.endswith(".kvp"):
        s.other_files += 1
        return
    m = _UNIT.fullmatch(e.name)
    try:
        if m is None or m.group(1)[:2] != subdir:
            raise CorruptUnit("file name is not <hex key>.r<rank>.kvp in its <2 hex> folder")
        layout, size, mtime = _check_unit(e.path, m.group(1), payload_too)
    except CorruptUnit:
        s.corrupt += 1
        s.corrupt_files.append(e.path)
        return
    except OSError:
        s.unreadable += 1
        return
    _add_unit(s, layout, int(m.group(2)), size, mtime)


def scan(root: str | os.PathLike, verify: bool = False) -> CacheSummary:
    root = Path(root)
    entries = _open_root(root)
    s = CacheSummary(path=str(root))
    for e in entries:
        if _PROBE_TMP.fullmatch(e.name):
            s.tmp_files += 1
        elif not (_SUBDIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)):
            s.other_files += 1
    for d in _subdirs(entries):
        for e in _children(d):
            if _is_file(e):
                _scan_file(s, d.name, e, verify)
            else:
                s.other_files += 1
    _require_kvplug(root, entries, s.units + s.corrupt + s.unreadable + s.tmp_files > 0)
    return s


def _stale(e: os.DirEntry, now: float, tmp_age_s: float) -> bool:
    try:
        return now - e.stat(follow_symlinks=False).st_mtime >= tmp_age_s
    except OSError:
        return False


def _plan_subdir(plan: ClearPlan, d: os.DirEntry, now: float, tmp_age_s: float) -> None:
    children = _children(d)
    kept = 0
    for e in children:
        if _is_file(e) and e.name.endswith(".kvp"):
            try:
                plan.bytes += e.stat(follow_symlinks=False).st_size
            except OSError:
                continue  # an engine evicted it meanwhile
            plan.files.append(Path(e.path))
            plan.unit_files += 1
        elif _is_file(e) and _UNIT_TMP.fullmatch(e.name) and _stale(e, now, tmp_age_s):
            plan.files.append(Path(e.path))
            plan.tmp_files += 1
        else:
            kept += 1
    if kept == 0:
        plan.dirs.append(Path(d.path))


def plan_clear(root: str | os.PathLike, tmp_age_s: float = 600.0) -> ClearPlan:
    """Temp files younger than tmp_age_s are kept: a live engine may be writing them."""
    root = Path(root)
    entries = _open_root(root)
    plan, now = ClearPlan(root=root), time.time()
    for e in entries:
        if _is_file(e) and _PROBE_TMP.fullmatch(e.name) and _stale(e, now, tmp_age_s):
            plan.files.append(Path(e.path))
            plan.tmp_files += 1
    for d in _subdirs(entries):
        _plan_subdir(plan, d, now, tmp_age_s)
    _require_kvplug(root, entries, bool(plan.files))
    return plan


def apply_clear(plan: ClearPlan) -> tuple[int, list[str]]:
    """Remove the plan's files, then its folders (rmdir: only if still empty)."""
    removed, failed = 0, []
    for p in plan.files:
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass  # an engine evicted it meanwhile
        except OSError as e:
            failed.append(f"{p}: {e.strerror}")
    for d in plan.dirs:
        try:
            d.rmdir()
        except OSError:
            pass  # an engine wrote into it meanwhile: keep it
    return removed, failed


def count_units(root: str | os.PathLike) -> int:
    root = Path(root)
    if not root.is_dir():
        return 0
    return sum(1 for d in _subdirs(list(os.scandir(root))) for e in _children(d)
               if _UNIT.fullmatch(e.name))


def count_tmp(root: str | os.PathLike) -> int:
    root = Path(root)
    if not root.is_dir():
        return 0
    return sum(1 for d in _subdirs(list(os.scandir(root))) for e in _children(d)
               if _UNIT_TMP.fullmatch(e.name))
