"""Bad units and bad input are misses, never wrong bytes and never an exception into SGLang:
corrupt and truncated files, a foreign rank's or model's page, a dead Redis, malformed calls."""
import socket

import pytest

pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="sglang not installed: run `make sglang`")

import torch  # noqa: E402

from sglang_helpers import kvplug_backend, sglang_keys, slots  # noqa: E402
from sglang_host_pool import MHAHostPool, fill_random, page_bytes  # noqa: E402

GEN = torch.Generator().manual_seed(99)


@pytest.fixture
def pool():
    p = MHAHostPool(pages=32)
    fill_random(p, GEN)
    return p


def unit_files(root):
    return sorted(root.rglob("*.kvp"))


def dead_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def write_pages(backend, pool, n, start=0):
    keys = sglang_keys(list(range(start, start + n * pool.page_size)), pool.page_size)
    assert all(backend.batch_set_v1(keys, slots(pool, range(n))))
    backend.flush()
    return keys


@pytest.mark.parametrize("damage", ["flip_payload_byte", "flip_header_byte", "truncate", "garbage", "empty"])
def test_a_damaged_unit_file_is_a_miss_and_is_removed(pool, tmp_path, damage):
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"))
    keys = write_pages(b, pool, 1)
    (path,) = unit_files(tmp_path / "kv")
    data = bytearray(path.read_bytes())
    if damage == "flip_payload_byte":
        data[-7] ^= 0x01
    elif damage == "flip_header_byte":
        data[20] ^= 0x01
    elif damage == "truncate":
        data = data[:-100]
    elif damage == "garbage":
        data = bytearray(b"not a kvplug unit" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    before = pool.kv_buffer.clone()
    assert b.batch_get_v1(keys, slots(pool, [5])) == [False]
    assert torch.equal(pool.kv_buffer.view(torch.uint8), before.view(torch.uint8))  # no wrong bytes landed
    assert b.get(keys[0], pool.get_dummy_flat_data_page()) is None
    assert not path.exists()
    assert b.batch_exists(keys) == 0
    b.close()


def test_a_damaged_page_can_be_written_again_and_read(pool, tmp_path):
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"))
    keys = write_pages(b, pool, 1)
    want = page_bytes(pool, 0)
    (path,) = unit_files(tmp_path / "kv")
    path.write_bytes(path.read_bytes()[:-1])
    assert b.batch_get_v1(keys, slots(pool, [3])) == [False]
    assert b.batch_set_v1(keys, slots(pool, [0])) == [True]
    assert b.batch_get_v1(keys, slots(pool, [4])) == [True]
    assert page_bytes(pool, 4 * pool.page_size) == want
    b.close()


def test_another_ranks_or_models_pages_are_misses(pool, tmp_path):
    root = str(tmp_path / "kv")
    rank0 = kvplug_backend(pool, tp_rank=0, tp_size=2, disk_path=root)
    keys = write_pages(rank0, pool, 2)
    rank1 = kvplug_backend(pool, tp_rank=1, tp_size=2, disk_path=root)
    other_model = kvplug_backend(pool, tp_rank=0, tp_size=2, disk_path=root, model_id="another-model")
    other_dtype_pool = MHAHostPool(pages=32, dtype=torch.float16)
    other_dtype = kvplug_backend(other_dtype_pool, tp_rank=0, tp_size=2, disk_path=root)
    for b, p in ((rank1, pool), (other_model, pool), (other_dtype, other_dtype_pool)):
        assert b.batch_exists(keys) == 0
        assert b.batch_get_v1(keys, slots(p, [7, 8])) == [False, False]
    assert rank0.batch_exists(keys) == 2
    for b in (rank0, rank1, other_model, other_dtype):
        b.close()


def test_mla_pages_are_shared_by_every_tensor_parallel_rank(tmp_path):
    from sglang_host_pool import MLAHostPool
    pool = MLAHostPool(pages=16)
    fill_random(pool, GEN)
    root = str(tmp_path / "kv")
    writer = kvplug_backend(pool, mla=True, tp_rank=0, tp_size=2, disk_path=root)
    keys = write_pages(writer, pool, 2)
    reader = kvplug_backend(pool, mla=True, tp_rank=1, tp_size=2, disk_path=root)
    assert reader.batch_exists(keys) == 2
    writer.close(), reader.close()


def test_a_dead_redis_gives_misses_without_waiting_on_it_again_and_disk_still_serves(pool, tmp_path):
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"), remote_url=dead_url(), remote_timeout_ms=50)
    keys = write_pages(b, pool, 3)
    # The first failed round trip opens the breaker: later calls answer without the network.
    assert b.store.remote.breaker.down
    assert b.batch_exists(keys) == 3  # from disk
    assert b.batch_get_v1(keys, slots(pool, [10, 11, 12])) == [True] * 3
    unknown = sglang_keys(list(range(500, 500 + 4 * pool.page_size)), pool.page_size)
    assert b.batch_exists(unknown) == 0
    assert b.batch_get_v1(unknown, slots(pool, range(4))) == [False] * 4
    stats = b.take_stats()
    assert stats["remote_skipped"] >= 4 and stats.get("remote_hits", 0) == 0  # the breaker answered, not Redis
    b.close()


def test_a_remote_only_backend_with_a_dead_redis_answers_misses_and_false(pool, tmp_path):
    b = kvplug_backend(pool, remote_url=dead_url(), remote_timeout_ms=50)
    keys = sglang_keys(list(range(4 * pool.page_size)), pool.page_size)
    for call in (lambda: b.batch_set_v1(keys, slots(pool, range(4))),
                 lambda: b.batch_exists(keys),
                 lambda: b.batch_get_v1(keys, slots(pool, range(4))),
                 lambda: b.batch_set(keys, [pool.get_data_page(0)] * 4),
                 lambda: b.get(keys[0], pool.get_dummy_flat_data_page())):
        out = call()
        assert out in (0, None, False, [False] * 4)
        assert b.store.remote.breaker.down  # the outage is known: no call waits on Redis again
    assert b.clear() is True  # best effort: nothing to reach, nothing raised
    b.close()


def test_malformed_calls_are_misses_not_exceptions(pool, tmp_path):
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"))
    keys = write_pages(b, pool, 2)
    assert b.batch_get_v1(keys, slots(pool, [0])) == [False, False]  # too few host slots
    assert b.batch_set_v1(keys, slots(pool, [0, 1, 2])) == [False, False]  # too many
    assert b.batch_get_v1(keys, None) == [False, False]
    assert b.set(keys[0], torch.ones(3)) is False  # not a page of this pool
    assert b.set(keys[0], pool.get_data_page(0).to(torch.float32)) is False  # wrong dtype
    assert b.batch_set(keys, [pool.get_data_page(0)]) is False  # fewer values than keys
    assert b.get(keys[0], torch.zeros(5, dtype=pool.dtype)) is None  # target of the wrong size
    assert b.batch_exists([None, 3]) == 0
    assert b.batch_get_v1([b"bytes-key"], slots(pool, [0])) == [False]
    b.close()


def test_calls_before_a_host_pool_is_registered_are_misses(tmp_path):
    from sglang_helpers import LOADER, storage_config
    from kvplug.sglang.backend import KVPlugHiCacheStorage
    b = KVPlugHiCacheStorage(storage_config({**LOADER, "disk_path": str(tmp_path / "kv")}), {})
    assert b.batch_exists(["ab" * 32]) == 0
    assert b.get("ab" * 32) is None
    assert b.set("ab" * 32, torch.ones(4)) is False
    b.close()


def test_bad_extra_config_fails_start_up_with_the_key_named(tmp_path):
    from sglang_helpers import LOADER, storage_config
    from kvplug.sglang.backend import KVPlugHiCacheStorage
    with pytest.raises(ValueError, match="eviction_policy='nope': allowed values are"):
        KVPlugHiCacheStorage(storage_config({**LOADER, "disk_path": str(tmp_path), "eviction_policy": "nope"}))


def test_hybrid_pool_groups_are_refused_at_attach(pool, tmp_path):
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"))
    b.register_mem_host_pool_v2(pool, "kv")
    b.on_host_pools_registered()  # a KV-only group is fine
    b.register_mem_host_pool_v2(pool, "mamba")
    with pytest.raises(ValueError, match="mamba"):
        b.on_host_pools_registered()
    b.close()


def test_the_multi_pool_interface_answers_misses(pool, tmp_path):
    from sglang.srt.mem_cache.hicache_storage import PoolTransfer
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"))
    keys = write_pages(b, pool, 2)
    t = PoolTransfer(name="kv", host_indices=slots(pool, [0, 1]), keys=keys)
    assert b.batch_exists_v2(keys, [t]).kv_hit_pages == 0
    assert b.batch_get_v2([t]) == {"kv": [False, False]}
    assert b.batch_set_v2([t]) == {"kv": [False, False]}
    b.close()
