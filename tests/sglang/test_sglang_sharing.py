"""What the tiers under SGLang keep and share: restart, two backends on one folder, eviction by the
configured policy, tenant quotas and TTLs, tenants that never see each other, the Redis tier."""
import time

import pytest

pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="sglang not installed: run `make sglang`")

import torch  # noqa: E402

from sglang_helpers import kvplug_backend, sglang_keys, slots  # noqa: E402
from sglang_host_pool import MHAHostPool, fill_random, page_bytes  # noqa: E402
from kvplug.sglang.keys import layout_tag, page_spec, unit_key  # noqa: E402
from kvplug.tiers.disk_format import encode_header  # noqa: E402
from redis_server import RedisServer, redis_available  # noqa: E402

GEN = torch.Generator().manual_seed(7)


@pytest.fixture
def pool():
    p = MHAHostPool(pages=64)
    fill_random(p, GEN)
    return p


def unit_bytes(pool, tp_rank=0, tp_size=1, namespace="") -> int:
    """The size of one unit file (header + page): what disk_bytes counts."""
    from sglang_helpers import storage_config
    from kvplug.sglang.keys import unit_layout
    layout = unit_layout(layout_tag(pool, storage_config(tp_rank=tp_rank, tp_size=tp_size)), namespace)
    n = page_spec(pool).nbytes
    return len(encode_header(bytes(32), layout, n, "0" * 8)) + n


def store(backend, pool, keys, pages):
    want = [page_bytes(pool, p * pool.page_size) for p in pages]
    assert backend.batch_set_v1(keys, slots(pool, pages)) == [True] * len(keys)
    backend.flush()
    return want


def load(backend, pool, keys, dest):
    ok = backend.batch_get_v1(keys, slots(pool, dest))
    return ok, [page_bytes(pool, p * pool.page_size) if hit else None for p, hit in zip(dest, ok)]


def keys_for(pool, n, start=0, cache_salt=None):
    return sglang_keys(list(range(start, start + n * pool.page_size)), pool.page_size, cache_salt)


def test_pages_are_found_again_after_a_restart(pool, tmp_path):
    root = str(tmp_path / "kv")
    first = kvplug_backend(pool, disk_path=root)
    keys = keys_for(pool, 8)
    want = store(first, pool, keys, range(8))
    first.close()
    fill_random(pool, GEN)
    second = kvplug_backend(pool, disk_path=root)
    assert second.batch_exists(keys) == 8
    assert load(second, pool, keys, range(20, 28)) == ([True] * 8, want)
    assert second.take_stats()["restored"] == 8
    second.close()


def test_a_restart_with_a_smaller_disk_bytes_keeps_the_newest_pages(pool, tmp_path):
    root = str(tmp_path / "kv")
    first = kvplug_backend(pool, disk_path=root)
    old, new = keys_for(pool, 4), keys_for(pool, 4, start=10_000)
    store(first, pool, old, range(4))
    time.sleep(0.05)  # the scan orders by file mtime
    store(first, pool, new, range(4, 8))
    first.close()
    second = kvplug_backend(pool, disk_path=root, disk_bytes=4 * unit_bytes(pool))
    second.flush()
    assert second.batch_exists(old[:1]) == 0
    assert second.batch_exists(new) == 4
    assert len(list((tmp_path / "kv").rglob("*.kvp"))) == 4
    second.close()


def test_two_backends_on_one_folder_read_each_others_pages(pool, tmp_path):
    root = str(tmp_path / "kv")
    a, b = kvplug_backend(pool, disk_path=root), kvplug_backend(pool, disk_path=root)
    keys = keys_for(pool, 5)
    want = store(a, pool, keys, range(5))
    assert b.batch_exists(keys) == 5
    assert load(b, pool, keys, range(30, 35)) == ([True] * 5, want)
    assert b.batch_set_v1(keys, slots(pool, range(5))) == [True] * 5  # already there: not rewritten
    b.flush()
    assert b.take_stats()["disk_puts"] == 0
    a.close(), b.close()


def test_disk_bytes_is_enforced_with_the_configured_policy(pool, tmp_path):
    cap = 6
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"), disk_bytes=cap * unit_bytes(pool),
                       eviction_policy="lru")
    first = keys_for(pool, cap)
    store(b, pool, first, range(cap))
    assert load(b, pool, first[:1], [40])[0] == [True]  # page 0 is now the most recently used
    later = keys_for(pool, 3, start=50_000)
    store(b, pool, later, range(10, 13))
    files = list((tmp_path / "kv").rglob("*.kvp"))
    assert len(files) == cap
    assert b.batch_exists(first[:1]) == 1  # kept by LRU
    assert b.batch_exists(first[1:2]) == 0  # the least recently used went
    assert b.batch_exists(later) == 3
    b.close()


def test_a_namespace_quota_caps_its_own_pages_only(pool, tmp_path):
    root = str(tmp_path / "kv")
    q = {"namespaces": {"small": {"disk_bytes": 2 * unit_bytes(pool, namespace="small")}}}
    small = kvplug_backend(pool, disk_path=root, namespace="small", **q)
    big = kvplug_backend(pool, disk_path=root, namespace="big", **q)
    keys = keys_for(pool, 5)
    for i in range(5):  # one page per call, as five backups would come
        store(small, pool, keys[i:i + 1], [i])
    store(big, pool, keys, range(5))
    assert small.batch_exists(keys) == 0  # its first three were evicted: no leading run
    assert small.batch_exists(keys[3:]) == 2
    assert big.batch_exists(keys) == 5
    small.close(), big.close()


def test_a_batch_larger_than_the_quota_keeps_its_leading_pages(pool, tmp_path):
    """Pages of one call are a prefix chain: a later page is useless without the ones before it,
    so the call's own pages are never evicted to make room for its later ones."""
    q = {"namespaces": {"": {"disk_bytes": 2 * unit_bytes(pool)}}}
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"), **q)
    keys = keys_for(pool, 5)
    assert b.batch_set_v1(keys, slots(pool, range(5))) == [True, True, False, False, False]
    assert b.batch_exists(keys) == 2
    b.close()


def test_a_namespace_ttl_expires_its_pages(pool, tmp_path):
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"), namespace="t",
                       namespaces={"t": {"ttl_s": 0.3}})
    keys = keys_for(pool, 2)
    store(b, pool, keys, range(2))
    assert b.batch_exists(keys) == 2
    time.sleep(0.5)
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, slots(pool, [9, 10])) == [False, False]
    b.flush()
    assert not list((tmp_path / "kv").rglob("*.kvp"))
    b.close()


def test_tenants_never_see_each_other(pool, tmp_path):
    """Per request, SGLang seeds its page keys with extra_key/cache_salt; per engine, kvplug folds
    its `namespace` into every unit key. Either way the same tokens are a miss for the other tenant."""
    root = str(tmp_path / "kv")
    a, b = kvplug_backend(pool, disk_path=root, namespace="a"), kvplug_backend(pool, disk_path=root, namespace="b")
    keys = keys_for(pool, 4)
    store(a, pool, keys, range(4))
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, slots(pool, range(4))) == [False] * 4
    assert b.get(keys[0], pool.get_dummy_flat_data_page()) is None
    salted = keys_for(pool, 4, cache_salt="tenant-x")
    store(a, pool, salted, range(4))
    assert a.batch_exists(keys_for(pool, 4, cache_salt="tenant-y")) == 0
    assert a.batch_exists(salted) == 4
    a.close(), b.close()


def test_clear_leaves_other_layouts_pages_on_a_shared_folder(pool, tmp_path):
    root = str(tmp_path / "kv")
    ours, other = kvplug_backend(pool, tp_rank=0, tp_size=2, disk_path=root), \
        kvplug_backend(pool, tp_rank=1, tp_size=2, disk_path=root)
    keys = keys_for(pool, 3)
    store(ours, pool, keys, range(3))
    store(other, pool, keys, range(3))
    assert ours.clear()
    assert ours.batch_exists(keys) == 0
    assert other.batch_exists(keys) == 3
    ours.close(), other.close()


def test_unit_keys_are_sglangs_keys_under_namespace_and_layout(pool, tmp_path):
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"), namespace="n")
    keys = keys_for(pool, 1)
    store(b, pool, keys, [0])
    expected = unit_key("n", layout_tag(pool, b.storage_config), keys[0]).hex()
    assert [p.name.split(".")[0] for p in (tmp_path / "kv").rglob("*.kvp")] == [expected]
    b.close()


@pytest.mark.skipif(not redis_available(), reason="redis-server not on PATH (apt-get install -y redis-server)")
def test_disk_plus_redis_shares_pages_across_machines_and_survives_redis_loss(pool, tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        a = kvplug_backend(pool, disk_path=str(tmp_path / "a"), remote_url=server.url)
        b = kvplug_backend(pool, disk_path=str(tmp_path / "b"), remote_url=server.url)
        keys = keys_for(pool, 6)
        want = store(a, pool, keys, range(6))
        assert b.batch_exists(keys) == 6  # nothing on b's disk: found in Redis
        assert load(b, pool, keys, range(40, 46)) == ([True] * 6, want)
        assert b.take_stats()["remote_hits"] == 6
        b.flush()  # promoted to b's disk
        assert len(list((tmp_path / "b").rglob("*.kvp"))) == 6
        assert b.clear() and server.client().dbsize() == 0
        store(b, pool, keys, range(6))
        server.kill()
        b.take_stats()
        assert load(b, pool, keys, range(50, 56)) == ([True] * 6, want)  # from b's disk
        unknown = keys_for(pool, 2, start=77_777)
        assert b.batch_exists(unknown) == 0
        stats = b.take_stats()  # the dead server was asked once at most, then left alone
        assert stats.get("remote_timeouts", 0) <= len(unknown) and b.store.remote.breaker.down
        a.close(), b.close()


@pytest.mark.skipif(not redis_available(), reason="redis-server not on PATH (apt-get install -y redis-server)")
def test_a_corrupt_redis_value_is_a_miss(pool, tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        b = kvplug_backend(pool, remote_url=server.url)
        keys = keys_for(pool, 1)
        store(b, pool, keys, [0])
        c = server.client()
        (name,) = c.keys("*")
        value = bytearray(c.get(name))
        value[-3] ^= 0xFF
        c.set(name, bytes(value))
        before = pool.kv_buffer.clone()
        assert b.batch_get_v1(keys, slots(pool, [5])) == [False]
        assert torch.equal(pool.kv_buffer.view(torch.uint8), before.view(torch.uint8))
        b.close()


@pytest.mark.skipif(not redis_available(), reason="redis-server not on PATH (apt-get install -y redis-server)")
def test_writes_faster_than_redis_takes_them_are_not_dropped(pool, tmp_path, monkeypatch):
    """The Redis writer drops puts past its pending-bytes cap without telling anyone; put_many waits
    for the writers before that, so every page SGLang was told is stored is stored."""
    import kvplug.sglang.store as store_mod
    page = page_spec(pool).nbytes
    monkeypatch.setattr(store_mod, "WRITE_BEHIND_BYTES", 2 * page)
    with RedisServer(tmp_path / "redis") as server:
        b = kvplug_backend(pool, remote_url=server.url)
        b.store.remote._writes.max_pending_bytes = 3 * page  # a small cap stands in for a slow Redis
        keys = keys_for(pool, 24)
        assert b.batch_set_v1(keys, slots(pool, range(24))) == [True] * 24
        b.flush()
        assert server.client().dbsize() == 24
        assert b.take_stats()["remote_dropped"] == 0
        b.close()
