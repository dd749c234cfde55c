"""Disk-tier faults caused for real: a writer killed with SIGKILL mid-write, a full tmpfs, a read-only
mount, and two processes racing to write the same keys.

Every payload is derived from (key, version) by a seeded generator (fault_helpers.unit_payload), so a
reader can tell a whole unit of a known version from anything else.
"""
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvplug.config import KVPlugConfig
from kvplug.tiers.disk import DiskStore, ScanStats, scan_units

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from fault_helpers import LAYOUT, mount_readonly, mount_tmpfs, shared_baseline, unit_key, unit_payload
from test_offload_e2e import (BLOCK, DRIVER, ENV, P1, P2, P3, assert_same_outputs, drive, model, n_blocks,  # noqa: F401
                              unit_bytes)

HELPERS = str(Path(__file__).with_name("fault_helpers.py"))
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def baseline(model, tmp_path_factory):
    """vLLM alone (one engine run shared by every fault and soak test of this pytest process)."""
    return shared_baseline(tmp_path_factory, model)


def writer(root: Path, name: str, first: int, count: int, nbytes: int, versions: str, rounds: int,
           fsync: bool = False, go: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if go is not None:
        env["FAULT_GO_FILE"] = str(go)
    argv = [sys.executable, HELPERS, "write", str(root), name, str(first), str(count), str(nbytes), versions,
            str(rounds), "1" if fsync else "0"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def temp_files(root: Path) -> list[Path]:
    return list(root.glob("??/*.tmp"))


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.01)


# ---- kill -9 mid-write ---------------------------------------------------------------------------

def test_writer_killed_mid_write_never_serves_a_torn_unit(tmp_path):
    root, nbytes, n_keys = tmp_path / "disk", 8 << 20, 24
    torn: list[Path] = []
    for attempt in range(4):  # a kill can land just after a rename; try again until one tears a file
        proc = writer(root, f"w{attempt}", 0, n_keys, nbytes, "v1", rounds=1000, fsync=True)
        try:
            deadline, killed = time.monotonic() + 60, False
            while time.monotonic() < deadline and proc.poll() is None:
                partial = [t for t in temp_files(root) if 0 < t.stat().st_size < nbytes]
                if len(list(root.glob("??/*.kvp"))) >= 3 and partial:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        assert killed, f"writer exited on its own or never wrote: {proc.stderr.read().decode()[-2000:]}"
        torn = [t for t in temp_files(root) if t.stat().st_size < nbytes]
        if torn:
            break
    assert torn, "four SIGKILLs never left a partly written temp file"

    store = DiskStore(root, LAYOUT)
    hits = 0
    for i in range(n_keys):
        key = unit_key(i)
        got = store.get(key)
        if got is not None:
            hits += 1
            assert torch.equal(got, unit_payload(key, "v1", nbytes)), f"unit {i} is not what was written"
    store.close()
    assert hits >= 3
    assert store.stats.corrupt == 0  # rename-into-place: no final file is ever torn

    # A young temp file may belong to a live writer: the start-up scan leaves it...
    leftovers = temp_files(root)
    stats = ScanStats()
    assert len(list(scan_units(root, LAYOUT, stats=stats))) == hits
    assert stats.tmp_removed == 0 and stats.corrupt == 0 and all(t.exists() for t in leftovers)
    # ...and removes it once it is older than tmp_max_age_s.
    time.sleep(0.3)
    stats = ScanStats()
    assert len(list(scan_units(root, LAYOUT, stats=stats, tmp_max_age_s=0.2))) == hits
    assert stats.tmp_removed == len(leftovers) and not temp_files(root)


# ---- disk full -----------------------------------------------------------------------------------

def test_full_disk_stops_writes_logs_once_and_keeps_serving(tmp_path, caplog):
    nbytes = 1 << 20
    log = logging.getLogger("kvplug.test.diskfull")
    with mount_tmpfs(tmp_path / "small", "4m") as mnt, caplog.at_level(logging.WARNING, logger=log.name):
        store = DiskStore(mnt / "kv", LAYOUT, on_error=log, backoff_s=0.5)
        keys = [unit_key(i, "full") for i in range(8)]
        for key in keys:  # 8 MiB into 4 MiB: no exception ever reaches the caller
            store.put(key, unit_payload(key, "v1", nbytes))
            store.flush()
        st = store.stats.take()
        written = [k for k in keys if (store.get(k) is not None)]
        assert len(written) == 3, st  # 3 x (1 MiB + header) fit in 4 MiB of pages
        assert st.write_errors >= 1 and st.write_errors + st.dropped == len(keys) - 3, st
        full_lines = [r for r in caplog.records if "disk full" in r.getMessage()]
        assert len(full_lines) == 1, [r.getMessage() for r in caplog.records]
        assert not temp_files(mnt / "kv")  # the failed write cleaned up its temp file
        for key in written:  # reads of earlier units go on
            assert torch.equal(store.get(key), unit_payload(key, "v1", nbytes))

        # Space comes back: after the back-off, writes resume; the next outage is logged again.
        store.delete(written[0])
        store.flush()
        time.sleep(0.6)
        store.put(keys[-1], unit_payload(keys[-1], "v1", nbytes))
        store.flush()
        assert torch.equal(store.get(keys[-1]), unit_payload(keys[-1], "v1", nbytes))
        time.sleep(0.6)
        store.put(keys[-2], unit_payload(keys[-2], "v1", nbytes))
        store.flush()
        assert store.get(keys[-2]) is None
        assert len([r for r in caplog.records if "disk full" in r.getMessage()]) == 2
        store.close()


@pytest.mark.e2e
def test_engine_on_a_full_disk_still_serves_baseline_outputs(model, n_blocks, unit_bytes, baseline, tmp_path):
    # 1 MiB of tmpfs holds 3 units of the tiny model (256 KiB + header each): P1's fit, P2's do not.
    with mount_tmpfs(tmp_path / "small", "1m") as mnt:
        extra = {"cpu_bytes": unit_bytes, "disk_path": str(mnt / "kv"), "disk_bytes": 1e9}
        steps = drive(tmp_path, "full", {"model": model, "extra": extra, "steps": [
            {"prompts": [P1]},
            {"prompts": [P2, P3], "reset_prefix_cache": True},
            {"prompts": [P1], "reset_prefix_cache": True},
            {"prompts": [P2, P3], "reset_prefix_cache": True},
        ]})
        assert len(list((mnt / "kv").glob("??/*.kvp"))) == 3 and not temp_files(mnt / "kv")
    for s in (steps[0], steps[2]):
        assert_same_outputs(s, baseline["P1"])
    for s in (steps[1], steps[3]):
        assert_same_outputs(s, baseline["P2"], i=0)
        assert_same_outputs(s, baseline["P3"], i=1)
    total = {k: sum(s["counters"].get(k, 0) for s in steps) for k in steps[0]["counters"]}
    assert total["disk_write_errors"] > 0, total
    assert steps[2]["counters"]["disk_hit_tokens"] > 0, steps[2]["counters"]  # P1's units were written
    log = (tmp_path / "full.log").read_text()
    assert log.count("disk full") == 1, [line for line in log.splitlines() if "disk full" in line]


# ---- read-only or unusable cache directory --------------------------------------------------------

def test_unusable_cache_dir_is_a_clear_config_error(tmp_path):
    with mount_readonly(tmp_path / "ro") as ro:
        with pytest.raises(ValueError, match=r"disk_path=.*/ro/kv.*cannot create the directory \(Read-only"):
            KVPlugConfig.from_dict({"disk_path": str(ro / "kv")})
        with pytest.raises(ValueError, match=r"disk_path=.*/ro'.*not writable"):
            KVPlugConfig.from_dict({"disk_path": str(ro)})
        with pytest.raises(OSError, match="not writable"):
            DiskStore(ro, LAYOUT)
    for path in ("/proc/kvplug-cache", "/sys/kvplug-cache"):
        with pytest.raises(ValueError, match=f"disk_path='{path}': cannot create"):
            KVPlugConfig.from_dict({"disk_path": path})


@pytest.mark.e2e
def test_engine_with_read_only_cache_dir_fails_at_start_up(model, tmp_path):
    with mount_readonly(tmp_path / "ro") as ro:
        spec = tmp_path / "ro.spec.json"
        spec.write_text('{"model": "%s", "extra": {"disk_path": "%s"}, "steps": [{"prompts": ["hi"]}]}'
                        % (model, ro / "kv"))
        log = tmp_path / "ro.log"
        with open(log, "w") as f:  # not a hang: bounded by the timeout
            proc = subprocess.run([sys.executable, str(DRIVER), str(spec), str(tmp_path / "ro.out.json")],
                                  stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=240)
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    assert f"disk_path='{ro / 'kv'}': cannot create the directory (Read-only file system)" in text, text[-3000:]


# ---- two processes writing the same keys ----------------------------------------------------------

def test_concurrent_writers_of_the_same_keys_never_mix_versions(tmp_path):
    root, nbytes, n_keys = tmp_path / "disk", 1 << 20, 16
    keys = [unit_key(i) for i in range(n_keys)]
    # Even keys: both write version "s" (same bytes). Odd keys: one writes "a", the other "b".
    allowed = {k: [unit_payload(k, v, nbytes) for v in (("s",) if i % 2 == 0 else ("a", "b"))]
               for i, k in enumerate(keys)}
    go = tmp_path / "go"
    procs = [writer(root, "A", 0, n_keys, nbytes, "s,a", rounds=6, go=go),
             writer(root, "B", 0, n_keys, nbytes, "s,b", rounds=6, go=go)]
    reads, errors = [0], []

    def reader(stop: threading.Event) -> None:
        with DiskStore(root, LAYOUT) as store:
            while not stop.is_set() and reads[0] < 100_000:
                for k in keys:
                    got = store.get(k)
                    if got is not None:
                        reads[0] += 1
                        if not any(torch.equal(got, want) for want in allowed[k]):
                            errors.append(k.hex())
    stop = threading.Event()
    t = threading.Thread(target=reader, args=(stop,))
    try:
        wait_for(lambda: all((tmp_path / f"{n}.ready").exists() for n in "AB"), 60, "both writers")
        t.start()
        go.touch()
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        t.join(timeout=60)
    assert not errors, f"{len(errors)} reads returned bytes of no written version"
    assert reads[0] > 0

    stats = ScanStats()
    assert len(list(scan_units(root, LAYOUT, stats=stats))) == n_keys
    assert stats.corrupt == 0 and not temp_files(root)
    with DiskStore(root, LAYOUT) as store:
        for k in keys:
            got = store.get(k)
            assert got is not None and any(torch.equal(got, want) for want in allowed[k])
        assert store.stats.corrupt == 0
