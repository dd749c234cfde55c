"""The start-up scan of disk_path (no engine): each worker scans its rank's files at register
(it knows its layouts), removes those that fail the scan, counts them in disk_corrupt
(vllm:kvplug_disk_corrupt_total) and logs them once with their number; the scheduler indexes
what every rank found from vLLM's connector handshake, without reading the folder. The oracle is
`kvplug stats --verify`, a separate read-only checker (kvplug/cli/cache_dir.py) run on the same
planted folder before the worker starts.

The planted defects are those a start-up scan can see without reading payloads: a header that
does not parse, a file cut short or grown, a name that does not match the key inside, a file of
someone else's named like a unit, a unit in the wrong fan-out folder. (A bit flip inside a
payload passes a header-only scan; the CRC finds it on the first read, which counts it then.)
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from fakes import facts, started_halves
from kvplug.connector.scheduler import SchedulerHalf
from kvplug.connector.worker import WorkerHalf
from kvplug.tiers.disk import DiskStore, unit_path

F = facts()


def engine(root: Path) -> tuple[SchedulerHalf, WorkerHalf]:
    """Both halves on `root`, as vLLM starts them: the worker registers its caches, the
    scheduler gets the workers' handshakes."""
    return started_halves({"cpu_bytes": 1e6, "disk_path": str(root), "disk_rescan_s": 0}, F)


def block_layout(tmp_path: Path) -> str:
    _, w = engine(tmp_path / "probe")
    w.close()
    return w.layout


ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def plant(root: Path, layout: str) -> tuple[list[bytes], int]:
    """4 good units (3 of `layout`, 1 of another: a blend chunk's), 7 bad files, a temp file and a
    file that is not kvplug's. Returns (good keys, number of bad files)."""
    gen = torch.Generator().manual_seed(0)
    keys = [bytes([i]) * 32 for i in range(1, 12)]
    with DiskStore(root, layout) as store:
        for k in keys[:9]:
            store.put(k, torch.randint(0, 256, (700,), dtype=torch.uint8, generator=gen))
    with DiskStore(root, "chunk-v2|layout") as store:
        store.put(keys[9], torch.randint(0, 256, (900,), dtype=torch.uint8, generator=gen))
    good = [keys[0], keys[1], keys[2], keys[9]]
    path = {k: unit_path(root, k, 0) for k in keys}
    path[keys[3]].write_bytes(path[keys[3]].read_bytes()[:-17])  # truncated
    with open(path[keys[4]], "ab") as f:
        f.write(b"appended")  # grown: size no longer the header's
    data = bytearray(path[keys[5]].read_bytes())
    data[:16] = os.urandom(16)  # header destroyed
    path[keys[5]].write_bytes(bytes(data))
    path[keys[10]].parent.mkdir(exist_ok=True)
    path[keys[6]].rename(path[keys[10]])  # a unit under another key's name
    path[keys[7]].write_bytes(b"")  # empty
    path[keys[8]].write_bytes(os.urandom(4096))  # someone else's bytes under a unit's name
    wrong_dir = root / "ff" / path[keys[0]].name  # key 01.. in the ff folder
    wrong_dir.parent.mkdir(exist_ok=True)
    wrong_dir.write_bytes(path[keys[0]].read_bytes())
    bad = 7  # keys 3, 4, 5, 8, 7, the renamed one (10), and the copy in the wrong folder
    (path[keys[0]].parent / "notes.txt").write_text("not kvplug's")
    (path[keys[1]].parent / f"{path[keys[1]].name}.99.{'ab' * 6}.tmp").write_bytes(b"a live writer's")
    return good, bad


def kvplug_stats(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "kvplug.cli.main", "stats", str(root), "--json", "--verify"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_startup_scan_counts_removed_corrupt_files_as_kvplug_stats_verify_reports(tmp_path, caplog):
    root = tmp_path / "disk"
    good, bad = plant(root, block_layout(tmp_path))
    before = kvplug_stats(root)
    assert before["corrupt"] == bad and before["units"] == len(good)  # the oracle sees what was planted

    with caplog.at_level(logging.INFO, logger="kvplug"):
        s, w = engine(root)
    stats = w.take_stats()
    assert stats is not None and stats.data["disk_corrupt"] == before["corrupt"]
    assert w.take_stats() is None  # reported once, not again with every step

    removed = [r.getMessage() for r in caplog.records if "corrupt/truncated unit files at start-up" in r.getMessage()]
    assert removed == [f"kvplug: disk tier {root}: removed {bad} corrupt/truncated unit files at start-up"]

    after = kvplug_stats(root)
    assert after["corrupt"] == 0 and after["units"] == len(good)  # only the bad ones went
    assert after["tmp_files"] == 1 and after["other_files"] == 1  # a live writer's temp file and notes.txt stay
    assert all(s.manager.lookup([k]) == ["disk"] for k in good[:3])
    # A chunk's unit is this engine's only when it blends (its chunk layout): the index leaves it out.
    assert s.manager.lookup([good[3]]) == []
    w.close()


def test_clean_disk_path_reports_no_corrupt_files_and_logs_no_removal(tmp_path, caplog):
    root = tmp_path / "disk"
    with DiskStore(root, block_layout(tmp_path)) as store:
        store.put(b"\x01" * 32, torch.arange(100, dtype=torch.uint8))
    with caplog.at_level(logging.INFO, logger="kvplug"):
        s, w = engine(root)
    stats = w.take_stats()
    assert stats is None or "disk_corrupt" not in stats.data
    assert not [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert s.manager.lookup([b"\x01" * 32]) == ["disk"]
    w.close()
