"""DiskStore and scan_units: round trips, queue order, corruption handling, write failures, sharing."""
import errno
import logging
import os
import threading

import pytest
import torch

from kvplug.tiers import disk as disk_mod
from kvplug.tiers.disk import DiskStore, ScanStats, scan_units, unit_path
from kvplug.tiers.disk_format import PREFIX_BYTES

LAYOUT = "cpu:bf16:L4:H2:B128:D64"
GEN = torch.Generator().manual_seed(1234)


def rand_key() -> bytes:
    return torch.randint(0, 256, (32,), dtype=torch.uint8, generator=GEN).numpy().tobytes()


def rand_payload(n: int) -> torch.Tensor:
    return torch.randint(1, 256, (n,), dtype=torch.uint8, generator=GEN)


@pytest.fixture
def store(tmp_path):
    with DiskStore(tmp_path / "kv", LAYOUT) as s:
        yield s


def stored(store, n=4096):
    """Put a random unit, wait until it is on disk, and return (key, payload, path)."""
    key, payload = rand_key(), rand_payload(n)
    store.put(key, payload)
    store.flush()
    return key, payload, unit_path(store.root, key, store.rank)


def gate_writes(monkeypatch, store) -> threading.Event:
    """Hold the writer thread before each write until the returned event is set."""
    release, original = threading.Event(), store._write_unit

    def gated(key, tensor, layout):
        release.wait(timeout=60)
        return original(key, tensor, layout)

    monkeypatch.setattr(store, "_write_unit", gated)
    return release


@pytest.mark.parametrize("n", [1, 1000, 4096 + 7, 3 << 20])
def test_round_trip(store, n):
    key, payload, path = stored(store, n)
    assert path.exists() and path.parent.name == key.hex()[:2]
    out = store.get(key)
    assert out is not payload and torch.equal(out, payload)
    assert store.exists(key) and store.get(rand_key()) is None
    s = store.stats.take()
    assert (s.puts, s.gets, s.hits, s.corrupt, s.write_errors) == (1, 2, 1, 0, 0)
    assert s.bytes_read == s.bytes_written == path.stat().st_size > n
    assert store.stats.take().gets == 0  # take() resets


def test_get_during_inflight_write_hits(store, monkeypatch):
    release = gate_writes(monkeypatch, store)
    key, payload = rand_key(), rand_payload(5000)
    store.put(key, payload)
    assert store.get(key) is payload and store.exists(key)
    assert not unit_path(store.root, key, 0).exists()
    release.set()
    store.flush()
    assert torch.equal(store.get(key), payload)


def test_put_then_delete_ends_deleted(store, monkeypatch):
    release = gate_writes(monkeypatch, store)
    key, payload = rand_key(), rand_payload(777)
    store.put(key, payload)
    store.delete(key)
    assert store.get(key) is None and not store.exists(key)  # the newest queued op wins
    release.set()
    store.flush()
    assert not unit_path(store.root, key, 0).exists() and store.get(key) is None
    store.delete(key)
    store.put(key, payload)
    store.flush()
    assert torch.equal(store.get(key), payload)
    assert store.stats.take().deletes == 2


def flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])


def foreign_magic(path):
    data = path.read_bytes()
    path.write_bytes(b"GGUF\0\0\0\x01" + data[8:])


@pytest.mark.parametrize("damage", [flip_payload_byte, truncate, foreign_magic])
def test_damaged_file_is_a_miss_removed_and_counted(store, damage):
    key, _, path = stored(store)
    damage(path)
    assert store.get(key) is None and not path.exists()
    assert store.stats.corrupt == 1 and store.stats.hits == 0


def test_header_claiming_another_key(store):
    key_a, _, path_a = stored(store)
    _, _, path_b = stored(store)
    os.replace(path_b, path_a)
    assert store.get(key_a) is None and not path_a.exists() and store.stats.corrupt == 1


def test_wrong_layout(store):
    key = rand_key()
    with DiskStore(store.root, "cpu:fp16:other") as other:
        other.put(key, rand_payload(300))
    path = unit_path(store.root, key, 0)
    assert path.exists()
    assert store.get(key) is None and not path.exists() and store.stats.corrupt == 1


def test_temp_file_of_killed_writer(store):
    key, payload, path = stored(store, 2000)
    good = path.read_bytes()
    path.unlink()
    # A writer killed before its rename leaves a complete-looking temp file beside the final name.
    old = path.with_name(path.name + ".999.deadbeef0000.tmp")
    young = path.with_name(path.name + ".999.deadbeef0001.tmp")
    old.write_bytes(good)
    young.write_bytes(good[:1000])
    os.utime(old, (1, 1))
    assert store.get(key) is None and not store.exists(key)
    stats = ScanStats()
    assert list(scan_units(store.root, stats=stats)) == []
    assert not old.exists() and young.exists()  # a young one may belong to a live writer
    assert (stats.tmp_removed, stats.corrupt) == (1, 0)


def test_scan_returns_exactly_the_good_units(tmp_path):
    root = tmp_path / "kv"
    r0, r1 = DiskStore(root, LAYOUT, rank=0), DiskStore(root, LAYOUT, rank=1)
    good = {}
    for i in range(12):
        s = r0 if i % 3 else r1
        key, payload = rand_key(), rand_payload(100 + 37 * i)
        s.put(key, payload)
        good[(key, s.rank)] = unit_path(root, key, s.rank)
    with DiskStore(root, "cpu:fp16:other") as other:
        other_key = rand_key()
        other.put(other_key, rand_payload(64))
    r0.close(), r1.close()
    bad = bad_files(root)
    keep = [root / "README", unit_path(root, other_key, 0)]
    (root / "README").write_text("not a unit")

    stats = ScanStats()
    found = {(u.key, u.rank): u for u in scan_units(root, LAYOUT, stats=stats)}
    assert set(found) == set(good)
    for k, u in found.items():
        assert u.nbytes == good[k].stat().st_size and u.mtime == good[k].stat().st_mtime
    assert (stats.units, stats.corrupt, stats.other_layout) == (12, len(bad), 1)
    assert not any(p.exists() for p in bad) and all(p.exists() for p in keep)
    assert len(list(scan_units(root))) == 13  # without a layout, every good unit


def bad_files(root):
    """Write one file of each kind scan_units must remove; return their paths."""
    units = sorted(p for p in root.rglob("*.kvp"))
    data = units[0].read_bytes()
    bad = {
        "bad_header": (unit_path(root, rand_key(), 0), data[:PREFIX_BYTES] + b"x" + data[PREFIX_BYTES + 1:]),
        "truncated": (unit_path(root, rand_key(), 0), data[:-1]),
        "junk": (unit_path(root, rand_key(), 2), bytes(range(1, 200))),
        "other_key": (unit_path(root, rand_key(), 0), data),
        "bad_name": (root / "ab" / "ab12.r0.kvp", data),
    }
    misplaced = unit_path(root, rand_key(), 0)
    misplaced = root / ("00" if misplaced.parent.name != "00" else "01") / misplaced.name
    bad["wrong_dir"] = (misplaced, data)
    for path, content in bad.values():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    return [p for p, _ in bad.values()]


def test_write_failure_disk_full(store, monkeypatch, caplog):
    key0, payload0, _ = stored(store)
    store.stats.take()

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    keys = [rand_key() for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="kvplug"):
        for k in keys:
            store.put(k, rand_payload(1000))  # no exception reaches the caller
            store.flush()
    warnings = [r for r in caplog.records if r.name == "kvplug" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
    s = store.stats.take()
    assert (s.puts, s.write_errors, s.dropped) == (3, 1, 2)  # back-off: later puts are not tried
    assert not any(store.exists(k) for k in keys)
    assert list(store.root.rglob("*.tmp")) == []
    assert torch.equal(store.get(key0), payload0)  # reads keep working


def test_writes_resume_after_backoff(tmp_path, monkeypatch, caplog):
    with DiskStore(tmp_path, LAYOUT, backoff_s=0.0) as store:
        def quota(src, dst):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="kvplug"):
            m.setattr(os, "replace", quota)
            for _ in range(3):
                store.put(rand_key(), rand_payload(10))
                store.flush()
        assert len([r for r in caplog.records if r.name == "kvplug"]) == 1  # once per outage
        assert store.stats.write_errors == 3
        key, payload, _ = stored(store, 10)
        assert torch.equal(store.get(key), payload)


def test_two_stores_share_a_root(tmp_path):
    with DiskStore(tmp_path, LAYOUT) as a, DiskStore(tmp_path, LAYOUT) as b:
        key, payload, _ = stored(a, 3000)
        assert b.exists(key) and torch.equal(b.get(key), payload)
        b.delete(key)
        b.flush()
        assert a.get(key) is None and not a.exists(key)


def test_ranks_are_separate_files(tmp_path):
    with DiskStore(tmp_path, LAYOUT, rank=0) as r0, DiskStore(tmp_path, LAYOUT, rank=3) as r3:
        key, p0, _ = stored(r0, 100)
        assert r3.get(key) is None
        p3 = rand_payload(100)
        r3.put(key, p3)
        r3.flush()
        assert torch.equal(r0.get(key), p0) and torch.equal(r3.get(key), p3)


def test_pending_bytes_cap_drops_puts(tmp_path, monkeypatch):
    with DiskStore(tmp_path, LAYOUT, max_pending_bytes=1000) as store:
        release = gate_writes(monkeypatch, store)
        k1, k2 = rand_key(), rand_key()
        store.put(k1, rand_payload(900))
        store.put(k2, rand_payload(900))
        release.set()
        store.flush()
        assert store.exists(k1) and not store.exists(k2) and store.stats.dropped == 1


def test_close_drains_and_rejects_later_ops(tmp_path):
    store = DiskStore(tmp_path, LAYOUT)
    key, payload = rand_key(), rand_payload(50)
    store.put(key, payload)
    store.close()
    store.close()
    assert unit_path(tmp_path, key, 0).exists()
    with pytest.raises(RuntimeError, match="closed"):
        store.put(key, payload)


def test_bad_arguments(tmp_path, store):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file"):
        DiskStore(tmp_path / "file", LAYOUT)
    with pytest.raises(OSError, match=str(tmp_path / "file" / "sub")):
        DiskStore(tmp_path / "file" / "sub", LAYOUT)
    with pytest.raises(ValueError, match="layout"):
        DiskStore(tmp_path, "")
    with pytest.raises(ValueError, match="rank"):
        unit_path(tmp_path, rand_key(), -1)
    with pytest.raises(ValueError, match="key"):
        store.get(b"short")
    with pytest.raises(ValueError, match="torch.float32"):
        store.put(rand_key(), torch.rand(8))
    with pytest.raises(ValueError, match="contiguous=False"):
        store.put(rand_key(), rand_payload(16)[::2])
