"""ChunkStore: CPU LRU by bytes, disk write-through, restart, disk cap, bad files, validation."""
import os

import pytest
import torch

from kvplug.blend.store import ChunkStore
from kvplug.tiers.disk import scan_units, unit_path
from kvplug.tiers.disk_format import read_header

L, H, D = 3, 2, 4  # layers, kv_heads, head_dim
GEN = torch.Generator().manual_seed(99)


def key(i: int) -> bytes:
    return bytes([i]) * 32


def rand_kv(tokens: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Random values that are never zero, so a zero-filled buffer cannot pass for a hit."""
    x = torch.rand(L, 2, tokens, H, D, generator=GEN) + 0.5
    sign = torch.randint(0, 2, x.shape, generator=GEN) * 2 - 1
    return (x * sign).to(dtype)


def per_token(dtype) -> int:
    return L * 2 * H * D * dtype.itemsize


def make(tmp_path=None, cpu_bytes=10 ** 9, disk_bytes=10 ** 9, dtype=torch.bfloat16, layout="m"):
    root = None if tmp_path is None else tmp_path / "chunks"
    return ChunkStore((L, H, D), dtype, cpu_bytes, root, disk_bytes, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_round_trip_is_a_copy(dtype):
    s = make(dtype=dtype)
    kv = rand_kv(5, dtype)
    s.put(key(1), kv)
    want = kv.clone()
    kv.fill_(0)  # the caller may reuse its tensor
    out = s.get(key(1))
    assert out.dtype == dtype and out.shape == (L, 2, 5, H, D) and torch.equal(out, want)
    assert s.get(key(2)) is None
    assert s.take_stats() == dict(cpu_hits=1, disk_hits=0, misses=1, puts=1, cpu_evictions=0,
                                  disk_evictions=0, corrupt=0)
    assert s.take_stats()["puts"] == 0  # reset on take


def test_cpu_put_accepts_non_contiguous_input():
    s = make()
    kv = rand_kv(6).transpose(2, 3).contiguous().transpose(2, 3)  # same shape, other strides
    assert not kv.is_contiguous()
    s.put(key(1), kv)
    out = s.get(key(1))
    assert out.is_contiguous() and torch.equal(out, kv)


def test_cpu_lru_eviction_by_bytes():
    t = per_token(torch.bfloat16)  # 96 bytes per token
    s = make(cpu_bytes=10 * t)
    s.put(key(1), rand_kv(4))  # 4 tokens
    s.put(key(2), rand_kv(3))  # 7
    s.put(key(3), rand_kv(3))  # 10: full
    assert s.get(key(1)) is not None  # 1 is now the most recent: order 2, 3, 1
    s.put(key(4), rand_kv(2))  # needs 2 more tokens: evicts 2 (3 tokens) -> 9
    assert s.get(key(2)) is None and s.get(key(3)) is not None  # order 1, 4, 3
    s.put(key(5), rand_kv(6))  # 9 + 6 > 10: evicts 1 (4) -> 5, then 4 (2) -> 3, then 3+6 = 9 fits
    assert [s.get(key(i)) is not None for i in (1, 3, 4, 5)] == [False, True, False, True]
    st = s.take_stats()
    assert st["cpu_evictions"] == 3 and st["misses"] == 3
    # A unit larger than the whole CPU budget is not kept, and evicts nothing.
    s.put(key(6), rand_kv(11))
    assert s.get(key(6)) is None and s.get(key(5)) is not None and s.take_stats()["cpu_evictions"] == 0


def test_cpu_put_of_a_known_key_replaces_it():
    t = per_token(torch.bfloat16)
    s = make(cpu_bytes=10 * t)
    s.put(key(1), rand_kv(6))
    new = rand_kv(4)
    s.put(key(1), new)  # 6 tokens freed first: 4 fit without evicting anything
    s.put(key(2), rand_kv(6))
    assert torch.equal(s.get(key(1)), new) and s.get(key(2)) is not None
    assert s.take_stats()["cpu_evictions"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_disk_write_through_and_restart(tmp_path, dtype):
    kvs = {i: rand_kv(i + 1, dtype) for i in range(1, 4)}
    with make(tmp_path, dtype=dtype) as s:
        for i, kv in kvs.items():
            s.put(key(i), kv)
        s.flush()
        assert unit_path(tmp_path / "chunks", key(1), 0).exists()
    # A fresh store (a restart) has an empty CPU tier and finds every unit on disk.
    with make(tmp_path, dtype=dtype) as s2:
        for i, kv in kvs.items():
            out = s2.get(key(i))
            assert out.dtype == dtype and out.shape == kv.shape and torch.equal(out, kv)
        assert s2.get(key(1)) is not None  # promoted to CPU by the first get
        st = s2.take_stats()
        assert (st["disk_hits"], st["cpu_hits"], st["misses"], st["corrupt"]) == (3, 1, 0, 0)


def test_disk_only_store(tmp_path):
    s = make(tmp_path, cpu_bytes=0)
    kv = rand_kv(3)
    s.put(key(1), kv)
    s.flush()
    assert torch.equal(s.get(key(1)), kv) and s.take_stats()["disk_hits"] == 1
    s.close()


def test_other_dtype_or_shape_does_not_read_foreign_units(tmp_path):
    with make(tmp_path, dtype=torch.bfloat16) as s:
        s.put(key(1), rand_kv(4))
        s.flush()
    with make(tmp_path, dtype=torch.float32) as s32:
        assert s32._disk_total == 0  # the scan skipped the bf16 unit
        assert s32.get(key(9)) is None
    with make(tmp_path, dtype=torch.bfloat16, layout="other-model") as so:
        assert so._disk_total == 0
    assert [u.key for u in scan_units(tmp_path / "chunks")] == [key(1)]  # left in place


def _file_size(tmp_path, k):
    return os.path.getsize(unit_path(tmp_path / "chunks", k, 0))


def test_disk_cap_evicts_least_recent(tmp_path):
    with make(tmp_path, cpu_bytes=0) as probe:  # learn the size of one 4-token file
        probe.put(key(0), rand_kv(4))
        probe.flush()
    size = _file_size(tmp_path, key(0))
    os.unlink(unit_path(tmp_path / "chunks", key(0), 0))
    s = make(tmp_path, cpu_bytes=0, disk_bytes=3 * size)
    for i in (1, 2, 3):
        s.put(key(i), rand_kv(4))
    s.flush()
    assert s.get(key(1)) is not None  # disk order now 2, 3, 1
    s.put(key(4), rand_kv(4))
    s.flush()
    assert not unit_path(tmp_path / "chunks", key(2), 0).exists()
    assert [s.get(key(i)) is not None for i in (1, 2, 3, 4)] == [True, False, True, True]
    assert s.take_stats()["disk_evictions"] == 1
    s.close()
    # A restart with a smaller cap deletes the oldest files (by mtime) down to the cap.
    os.utime(unit_path(tmp_path / "chunks", key(1), 0), (1, 1))
    with make(tmp_path, cpu_bytes=0, disk_bytes=2 * size) as s2:
        s2.flush()
        assert s2.take_stats()["disk_evictions"] == 1
        assert s2.get(key(1)) is None and s2.get(key(3)) is not None and s2.get(key(4)) is not None


def test_disk_folder_never_exceeds_the_cap_while_writes_are_carried_out(tmp_path, monkeypatch):
    # The tier manager had this bug (a write queued before the delete of the unit it displaced);
    # watch the folder after every disk op the writer carries out.
    with make(tmp_path, cpu_bytes=0) as probe:
        probe.put(key(0), rand_kv(4))
        probe.flush()
    size = _file_size(tmp_path, key(0))
    os.unlink(unit_path(tmp_path / "chunks", key(0), 0))
    s = make(tmp_path, cpu_bytes=0, disk_bytes=2 * size)
    seen, carry_out = [], s._disk._carry_out

    def watched(*op):
        carry_out(*op)
        seen.append(sum(f.stat().st_size for f in (tmp_path / "chunks").glob("??/*.kvp")))
    monkeypatch.setattr(s._disk, "_carry_out", watched)
    for i in range(1, 7):
        s.put(key(i), rand_kv(4))
    s.flush()
    assert len(seen) == 6 + 4 and max(seen) <= 2 * size  # 6 writes, 4 evictions
    s.close()


def test_unit_larger_than_the_disk_cap_is_not_written(tmp_path):
    with make(tmp_path, disk_bytes=100) as s:
        s.put(key(1), rand_kv(4))
        s.flush()
        assert not unit_path(tmp_path / "chunks", key(1), 0).exists()
        assert s.get(key(1)) is not None  # still served from CPU


def test_zero_disk_bytes_keeps_chunk_kv_off_disk(tmp_path):
    with make(tmp_path, disk_bytes=0) as s:
        s.put(key(1), rand_kv(2))
        s.flush()
    assert not (tmp_path / "chunks").exists()


def test_corrupt_file_is_a_miss_not_an_exception(tmp_path):
    with make(tmp_path) as s:
        s.put(key(1), rand_kv(4))
        s.flush()
    path = unit_path(tmp_path / "chunks", key(1), 0)
    with open(path, "r+b") as f:
        header = read_header(f)
        f.seek(-(header.nbytes // 2), os.SEEK_END)  # a byte in the middle of the payload
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    with make(tmp_path) as s2:
        assert s2.get(key(1)) is None
        st = s2.take_stats()
        assert (st["corrupt"], st["misses"], st["disk_hits"]) == (1, 1, 0)
        assert not path.exists()  # removed by the disk tier
        assert s2._disk_total == 0


@pytest.mark.parametrize("nbytes", [0, 7, per_token(torch.bfloat16) + 2])
def test_wrong_size_payload_is_a_miss(tmp_path, nbytes):
    s = make(tmp_path)
    payload = torch.randint(1, 256, (nbytes,), dtype=torch.uint8, generator=GEN)
    s._disk.put(key(1), payload)  # a well-formed unit of this layout holding a bad-sized payload
    s._disk.flush()
    assert s.get(key(1)) is None
    st = s.take_stats()
    assert (st["corrupt"], st["misses"]) == (1, 1)
    s.flush()
    assert not unit_path(tmp_path / "chunks", key(1), 0).exists()  # deleted: it would never load
    s.close()


@pytest.mark.parametrize("kv, match", [
    (torch.zeros(L, 2, 4, H, D, dtype=torch.float32), "dtype torch.float32"),
    (torch.zeros(L + 1, 2, 4, H, D, dtype=torch.bfloat16), r"shape \(4, 2, 4, 2, 4\)"),
    (torch.zeros(L, 3, 4, H, D, dtype=torch.bfloat16), "shape"),
    (torch.zeros(L, 2, 4, H, D + 1, dtype=torch.bfloat16), "shape"),
    (torch.zeros(L, 2, 4, H * D, dtype=torch.bfloat16), "shape"),
    (torch.zeros(L, 2, 0, H, D, dtype=torch.bfloat16), "tokens >= 1"),
    ([1, 2], "torch.Tensor"),
])
def test_put_validates_shape_and_dtype(kv, match):
    s = make()
    with pytest.raises(ValueError, match=match):
        s.put(key(1), kv)
    assert s.take_stats()["puts"] == 0


def test_put_validates_key():
    with pytest.raises(ValueError, match="32 bytes"):
        make().put(b"short", rand_kv(1))


@pytest.mark.parametrize("args, match", [
    (((L, H), torch.bfloat16, 1, None, 0, "m"), "shape"),
    (((L, 0, D), torch.bfloat16, 1, None, 0, "m"), "kv_heads=0"),
    (((L, H, D), "bf16", 1, None, 0, "m"), "dtype"),
    (((L, H, D), torch.bfloat16, -1, None, 0, "m"), "cpu_bytes=-1"),
    (((L, H, D), torch.bfloat16, 1, None, 1.5, "m"), "disk_bytes=1.5"),
    (((L, H, D), torch.bfloat16, 1, None, 0, ""), "layout"),
])
def test_constructor_validation(args, match):
    with pytest.raises(ValueError, match=match):
        ChunkStore(*args)


def test_disk_layout_names_dtype_and_shape(tmp_path):
    with make(tmp_path, layout="cpu:llama") as s:
        s.put(key(1), rand_kv(1))
        s.flush()
        with open(unit_path(tmp_path / "chunks", key(1), 0), "rb") as f:
            assert read_header(f).layout == s.disk_layout == "chunk|cpu:llama|bfloat16|L3H2D4"
