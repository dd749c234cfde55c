"""RemoteStore / RemoteIndex against a real loopback redis-server: round trips, batches, TTL, namespaces,
corruption, and outages (killed, hung, restarted server)."""
import hashlib
import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_server import RedisServer, free_port, redis_available  # noqa: E402

from kvplug.tiers.disk import DiskStore, unit_path  # noqa: E402
from kvplug.tiers.disk_format import PREFIX_BYTES, decode_unit  # noqa: E402
from kvplug.tiers.remote import (RemoteIndex, RemoteStore, make_client, parse_url,  # noqa: E402
                                 redact, redis_key)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not redis_available(),
                       reason="redis-server not on PATH (apt-get install -y redis-server)"),
]

LAYOUT = "cpu:bf16:L4:H2:B128:D64"
GEN = torch.Generator().manual_seed(4321)
BACKOFF_S = 0.3


def rand_key() -> bytes:
    return torch.randint(0, 256, (32,), dtype=torch.uint8, generator=GEN).numpy().tobytes()


def rand_payload(n: int) -> torch.Tensor:
    return torch.randint(1, 256, (n,), dtype=torch.uint8, generator=GEN)


def wait_until(cond, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as s:
        yield s


@pytest.fixture
def own_server(tmp_path):
    """A server this test may kill, pause and restart."""
    with RedisServer(tmp_path / "redis") as s:
        yield s


@pytest.fixture
def ns(request):
    """A namespace of this test alone, so tests sharing the module server never see each other."""
    return f"t{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]}"


@pytest.fixture
def raw(server):
    with server.client() as c:
        yield c


def make_store(server, ns, **kw):
    kw.setdefault("backoff_s", BACKOFF_S)
    return RemoteStore(server.url, kw.pop("layout", LAYOUT), namespace=ns, **kw)


def stored(store, n=4096):
    key, payload = rand_key(), rand_payload(n)
    store.put(key, payload)
    store.flush()
    return key, payload


@pytest.mark.parametrize("n", [1, 1000, 4096 + 7, 3 << 20])
def test_round_trip(server, ns, raw, n):
    with make_store(server, ns) as store:
        key, payload = stored(store, n)
        out = store.get(key)
        assert out is not payload and torch.equal(out, payload)
        assert store.get(rand_key()) is None
        value = raw.get(redis_key(ns, key, 0))
        header, body = decode_unit(value)
        assert (header.key, header.layout, bytes(body)) == (key, LAYOUT, payload.numpy().tobytes())
        s = store.stats.take()
        assert (s.puts, s.gets, s.hits, s.corrupt, s.write_errors, s.timeouts) == (1, 2, 1, 0, 0, 0)
        assert s.bytes_read == s.bytes_written == len(value) > n
        assert store.stats.take().gets == 0  # take() resets


def test_value_is_the_disk_file(server, ns, raw, tmp_path):
    """A unit moves between the remote and disk tiers as the same bytes, both ways."""
    with make_store(server, ns) as store, DiskStore(tmp_path / "kv", LAYOUT) as disk:
        key, payload = stored(store, 70_001)
        path = unit_path(disk.root, key, 0)
        path.parent.mkdir(parents=True)
        path.write_bytes(raw.get(redis_key(ns, key, 0)))
        assert torch.equal(disk.get(key), payload)
        key2, payload2 = rand_key(), rand_payload(5000)
        disk.put(key2, payload2)
        disk.flush()
        raw.set(redis_key(ns, key2, 0), unit_path(disk.root, key2, 0).read_bytes())
        assert torch.equal(store.get(key2), payload2)


def test_ranks_are_separate_units(server, ns):
    with make_store(server, ns, rank=0) as r0, make_store(server, ns, rank=1) as r1:
        key, p0 = stored(r0, 300)
        assert r1.get(key) is None
        p1 = rand_payload(301)
        r1.put(key, p1)
        r1.flush()
        assert torch.equal(r0.get(key), p0) and torch.equal(r1.get(key), p1)


class RoundTrips:
    """Counts pipeline executions and refuses plain commands on one client."""

    def __init__(self, monkeypatch, client):
        self.count = 0
        make_pipe = client.pipeline

        def pipeline(*a, **kw):
            pipe = make_pipe(*a, **kw)
            execute = pipe.execute

            def counted(*ea, **ekw):
                self.count += 1
                return execute(*ea, **ekw)
            pipe.execute = counted
            return pipe

        def refuse(*a, **kw):
            raise AssertionError(f"a command outside the pipeline: {a}")

        monkeypatch.setattr(client, "pipeline", pipeline)
        monkeypatch.setattr(client, "execute_command", refuse)


def test_get_many_is_one_round_trip(server, ns, monkeypatch):
    with make_store(server, ns) as store:
        units = [stored(store, n) for n in (10, 5000, 123_457)]
        keys = [units[0][0], rand_key(), units[1][0], units[2][0], rand_key()]
        trips = RoundTrips(monkeypatch, store._reader.client())
        out = store.get_many(keys)
        assert trips.count == 1
        assert out[1] is None and out[4] is None
        for i, (_, payload) in zip((0, 2, 3), units):
            assert torch.equal(out[i], payload)
        assert store.get_many([]) == []
        s = store.stats.take()
        assert (s.gets, s.hits) == (len(keys), 3)


def test_exists_many_mix_in_one_round_trip(server, ns, monkeypatch):
    with make_store(server, ns, rank=0) as r0, make_store(server, ns, rank=1) as r1:
        both, only0 = rand_key(), rand_key()
        for k in (both, only0):
            r0.put(k, rand_payload(64))
        r1.put(both, rand_payload(64))
        r0.flush()
        r1.flush()
    with RemoteIndex(server.url, namespace=ns) as index:
        trips = RoundTrips(monkeypatch, index._remote.client())
        absent = rand_key()
        assert index.exists_many([both, absent, only0], ranks=1) == [True, False, True]
        assert index.exists_many([both, absent, only0], ranks=2) == [True, False, False]
        assert trips.count == 2 and index.exists_many([], 2) == [] and index.healthy
        with pytest.raises(ValueError, match="ranks"):
            index.exists_many([both], ranks=0)
        with pytest.raises(ValueError, match="32 bytes"):
            index.exists_many([b"short"])


def test_ttl_expires_units(server, ns, raw):
    with make_store(server, ns, ttl_s=1) as store:
        key, _ = stored(store, 2000)
        assert 0 < raw.pttl(redis_key(ns, key, 0)) <= 1000
        wait_until(lambda: store.get(key) is None, 10.0, "expiry")
    with make_store(server, ns) as store:
        key, _ = stored(store, 2000)
        assert raw.ttl(redis_key(ns, key, 0)) == -1  # ttl_s=0: no expiry


def test_per_put_ttl_overrides_the_store_default(server, ns, raw):
    with make_store(server, ns) as store:  # no default expiry
        key, payload = rand_key(), rand_payload(3000)
        store.put(key, payload, ttl_s=5)  # a tenant's own TTL
        store.flush()
        assert 0 < raw.pttl(redis_key(ns, key, 0)) <= 5000


def test_namespaces_never_see_each_other(server, ns):
    with make_store(server, ns + "a") as a, make_store(server, ns + "b") as b:
        key = rand_key()
        pa, pb = rand_payload(999), rand_payload(1001)
        a.put(key, pa)
        a.flush()
        assert b.get(key) is None
        with RemoteIndex(server.url, namespace=ns + "b") as ib:
            assert ib.exists_many([key]) == [False]
        b.put(key, pb)
        b.flush()
        assert torch.equal(a.get(key), pa) and torch.equal(b.get(key), pb)


def corruptions(good: bytes):
    flip_payload = bytearray(good)
    flip_payload[-1] ^= 0x10
    flip_header = bytearray(good)
    flip_header[PREFIX_BYTES + 3] ^= 0x01
    return {"garbage": bytes(range(1, 200)), "payload bit": bytes(flip_payload),
            "header bit": bytes(flip_header), "truncated": good[:-1], "empty": b""}


@pytest.mark.parametrize("how", ["garbage", "payload bit", "header bit", "truncated", "empty"])
def test_corrupt_value_is_a_counted_miss_and_deleted(server, ns, raw, how):
    with make_store(server, ns) as store:
        key, _ = stored(store, 4000)
        rkey = redis_key(ns, key, 0)
        raw.set(rkey, corruptions(raw.get(rkey))[how])
        store.stats.take()
        assert store.get(key) is None
        assert (store.stats.take().corrupt, raw.exists(rkey)) == (1, 0)


def test_value_of_another_type_is_a_miss(server, ns, raw):
    with make_store(server, ns) as store:
        key = rand_key()
        raw.rpush(redis_key(ns, key, 0), b"x")
        assert store.get_many([key, rand_key()]) == [None, None]
        s = store.stats.take()
        assert (s.corrupt, s.timeouts) == (1, 0) and store.breaker.allow()


def test_foreign_layout_and_moved_value_are_misses(server, ns, raw):
    with make_store(server, ns, layout="other-layout") as other, make_store(server, ns) as store:
        key, _ = stored(other, 512)
        assert store.get(key) is None and store.stats.take().corrupt == 1
        # A good unit stored under another key's name: the header's key does not match.
        key2, _ = stored(store, 512)
        moved = rand_key()
        raw.set(redis_key(ns, moved, 0), raw.get(redis_key(ns, key2, 0)))
        assert store.get(moved) is None and store.stats.take().corrupt == 1
        assert store.get(key2) is not None


def test_bad_value_rewritten_meanwhile_is_kept(server, ns, raw):
    """The delete of a bad value is conditional: a good unit written since then survives."""
    with make_store(server, ns) as store:
        key, payload = stored(store, 800)
        rkey = redis_key(ns, key, 0)
        good = raw.get(rkey)
        store._delete_if_same(key, b"some other bad value")
        assert raw.get(rkey) == good
        store._delete_if_same(key, good)
        assert raw.exists(rkey) == 0


def test_delete_and_queued_ops(server, ns, raw, monkeypatch):
    with make_store(server, ns) as store:
        release, original = threading.Event(), store._carry_out

        def gated(*a):
            release.wait(timeout=30)
            return original(*a)

        monkeypatch.setattr(store, "_carry_out", gated)
        key, payload = rand_key(), rand_payload(5000)
        store.put(key, payload)
        assert store.get(key) is payload  # a queued put is already visible to this store
        store.delete(key)
        assert store.get(key) is None
        release.set()
        store.flush()
        assert raw.exists(redis_key(ns, key, 0)) == 0 and store.get(key) is None
        assert store.stats.take().deletes == 1


def test_full_queue_drops_and_counts(server, ns, monkeypatch):
    with make_store(server, ns, max_pending_bytes=10_000) as store:
        release, original = threading.Event(), store._carry_out
        monkeypatch.setattr(store, "_carry_out", lambda *a: (release.wait(30), original(*a)))
        keys = [rand_key() for _ in range(4)]
        for k in keys:
            store.put(k, rand_payload(4000))  # the third exceeds 10 kB pending
        release.set()
        store.flush()
        s = store.stats.take()
        assert (s.puts, s.dropped) == (4, 2)
        assert [t is not None for t in store.get_many(keys)] == [True, True, False, False]


def test_put_rejects_bad_arguments(server, ns):
    with make_store(server, ns) as store:
        with pytest.raises(ValueError, match="32 bytes"):
            store.put(b"k", rand_payload(3))
        with pytest.raises(ValueError, match="uint8"):
            store.put(rand_key(), torch.ones(3))
        with pytest.raises(ValueError, match="contiguous"):
            store.put(rand_key(), rand_payload(8)[::2])
    with pytest.raises(RuntimeError, match="closed"):
        store.put(rand_key(), rand_payload(3))
    with pytest.raises(ValueError, match="layout"):
        RemoteStore(server.url, "")
    with pytest.raises(ValueError, match="ttl_s"):
        RemoteStore(server.url, LAYOUT, ttl_s=-1)


def test_urls():
    assert parse_url("redis+cluster://h:1/0") == ("redis://h:1/0", True)
    assert parse_url("valkeys://h:1", cluster=True) == ("rediss://h:1", True)
    assert parse_url("redis://h:1/2") == ("redis://h:1/2", False)
    for bad in ("http://h:1", "h:6379", "unix+cluster:///s"):
        with pytest.raises(ValueError, match="url"):
            parse_url(bad)
    with pytest.raises(ValueError, match="unix"):
        parse_url("unix:///tmp/r.sock", cluster=True)
    client = make_client("rediss://127.0.0.1:1/0", 0.05)  # makes no connection
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert redact("redis://user:secret@127.0.0.1:6379/0") == "redis://***@127.0.0.1:6379/0"


def test_every_client_waits_at_most_its_timeout_per_round_trip_and_retries_once():
    """Why an outage is a quick miss: every socket operation is bounded by the configured timeout,
    a dead pooled connection is retried once, a timeout never (asserted on the clients kvplug
    builds, not by timing them); the breaker then keeps later calls off the network (below)."""
    for url in ("redis://127.0.0.1:1/0", "unix:///tmp/kvplug-none.sock"):
        kw = make_client(url, 0.05).connection_pool.connection_kwargs
        assert kw["socket_timeout"] == kw["socket_connect_timeout"] == 0.05
        assert kw["retry"]._retries == 1 and kw["retry"]._supported_errors == (redis.ConnectionError,)


def test_killed_server_is_a_quick_miss_logged_once(own_server, caplog):
    caplog.set_level(logging.INFO, logger="kvplug")
    store = RemoteStore(own_server.url, LAYOUT, backoff_s=BACKOFF_S)
    index = RemoteIndex(own_server.url, backoff_s=BACKOFF_S)
    key, payload = stored(store, 100_000)
    assert index.exists_many([key]) == [True]
    own_server.kill()
    for _ in range(3):  # inside and after the back-off window
        assert store.get(key) is None
        assert store.breaker.down  # the failure opened the breaker: calls inside its window skip the network
        assert store.get_many([key, rand_key()]) == [None, None]
        assert index.exists_many([key, rand_key()], 2) == [False, False]
        time.sleep(BACKOFF_S)
    assert not index.healthy
    s = store.stats.take()
    assert s.timeouts >= 1 and s.skipped >= 1 and s.hits == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one for the store, one for the index, however many calls failed
    store.close()
    index.close()


def test_restarted_server_works_again_with_the_same_objects(own_server, caplog):
    caplog.set_level(logging.INFO, logger="kvplug")
    store = RemoteStore(own_server.url, LAYOUT, backoff_s=BACKOFF_S)
    index = RemoteIndex(own_server.url, backoff_s=BACKOFF_S)
    stored(store, 1000)
    own_server.kill()
    during = rand_key()
    store.get(during)
    index.exists_many([during])
    store.put(during, rand_payload(1000))  # breaker open: dropped at once
    store.flush()
    assert store.stats.take().dropped == 1
    own_server.restart()  # empty: nothing is persisted
    after, payload = rand_key(), rand_payload(200_000)

    def lands():
        store.put(after, payload)
        store.flush()
        return store.get(after) is not None
    wait_until(lands, 10.0, "a put after the restart landing")
    assert torch.equal(store.get(after), payload) and store.get(during) is None
    assert wait_until(lambda: index.exists_many([after, during]) == [True, False], 10.0, "index back")
    assert index.healthy
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 2
    store.close()
    index.close()


def test_writer_survives_an_outage(own_server):
    store = RemoteStore(own_server.url, LAYOUT, backoff_s=BACKOFF_S)
    key0, _ = stored(store, 10)
    own_server.kill()
    lost = [rand_key() for _ in range(20)]
    for k in lost:
        store.put(k, rand_payload(50_000))
    done = threading.Thread(target=store.flush, daemon=True)
    done.start()
    done.join(timeout=30)
    assert not done.is_alive(), "the writer is wedged"
    s = store.stats.take()
    assert s.dropped + s.write_errors >= 1 and s.dropped + s.bytes_written // 50_000 <= 20
    own_server.restart()
    time.sleep(BACKOFF_S)
    key, payload = rand_key(), rand_payload(3 << 20)
    wait_until(lambda: (store.put(key, payload), store.flush(), store.get(key) is not None)[2], 10.0,
               "a put after the outage landing")
    assert torch.equal(store.get(key), payload)
    store.close()


def test_hung_server_is_a_bounded_miss(own_server):
    store = RemoteStore(own_server.url, LAYOUT, backoff_s=BACKOFF_S, write_timeout_s=0.5)
    index = RemoteIndex(own_server.url, backoff_s=BACKOFF_S)
    key, payload = stored(store, 20_000)
    own_server.pause()  # accepts connections (the kernel does), never answers
    try:
        assert store.get(key) is None
        assert store.breaker.down  # one timed-out round trip opens the breaker: the network is left alone
        assert index.exists_many([key]) == [False]
        store.put(rand_key(), rand_payload(10))
        time.sleep(BACKOFF_S)
        assert store.get(key) is None
        assert index.exists_many([key]) == [False]
        assert store.stats.take().timeouts >= 2
    finally:
        own_server.resume()
    wait_until(lambda: index.exists_many([key]) == [True], 10.0, "index after resume")
    wait_until(lambda: store.get(key) is not None, 10.0, "store after resume")
    store.close()
    index.close()


def test_server_down_at_start(tmp_path):
    srv = RedisServer(tmp_path / "redis", port=free_port())
    store = RemoteStore(srv.url, LAYOUT, backoff_s=BACKOFF_S)
    index = RemoteIndex(srv.url, backoff_s=BACKOFF_S)
    key = rand_key()
    assert index.exists_many([key]) == [False] and store.get(key) is None
    with srv:
        time.sleep(BACKOFF_S)
        wait_until(lambda: (store.put(key, rand_payload(7)), store.flush(), store.get(key))[2]
                   is not None, 10.0, "store after the server started")
        assert index.exists_many([key]) == [True]
        store.close()
        index.close()


def test_cluster_round_trip(tmp_path):
    with RedisServer(tmp_path / "redis", cluster=True) as srv:
        assert srv.url.startswith("redis+cluster://")
        with RemoteStore(srv.url, LAYOUT, namespace="c") as store, \
                RemoteIndex(srv.url, namespace="c") as index:
            units = [stored(store, n) for n in (1, 3000, 1 << 20)]
            keys = [k for k, _ in units] + [rand_key()]
            out = store.get_many(keys)
            assert all(torch.equal(o, p) for o, (_, p) in zip(out, units)) and out[-1] is None
            assert index.exists_many(keys) == [True, True, True, False]
            store.delete(keys[0])
            store.flush()
            assert index.exists_many(keys[:1]) == [False]


def test_stale_pooled_connection_is_retried_not_an_outage(own_server):
    """A server restarted between two calls: the pooled connection is dead, the call reconnects."""
    with RemoteStore(own_server.url, LAYOUT, backoff_s=30.0) as store, \
            RemoteIndex(own_server.url, backoff_s=30.0) as index:
        key, _ = stored(store, 100)
        assert store.get(key) is not None and index.exists_many([key]) == [True]
        own_server.kill()
        own_server.restart()
        assert store.get(key) is None and index.exists_many([key]) == [False]  # nothing persisted
        assert store.stats.take().timeouts == 0 and index.healthy
        key, payload = stored(store, 100)
        assert torch.equal(store.get(key), payload) and index.exists_many([key]) == [True]


def test_cluster_outage_and_restart(tmp_path):
    with RedisServer(tmp_path / "redis", cluster=True) as srv:
        store = RemoteStore(srv.url, LAYOUT, backoff_s=BACKOFF_S)
        index = RemoteIndex(srv.url, backoff_s=BACKOFF_S)
        key, _ = stored(store, 1000)
        srv.kill()
        for _ in range(2):
            assert store.get(key) is None
            assert index.exists_many([key]) == [False]
            time.sleep(BACKOFF_S)
        srv.restart()  # nodes.conf keeps the slot assignment; the data is gone
        key, payload = rand_key(), rand_payload(1000)
        wait_until(lambda: (store.put(key, payload), store.flush(), store.get(key))[2] is not None,
                   10.0, "cluster store after the restart")
        assert wait_until(lambda: index.exists_many([key]) == [True], 10.0, "cluster index back")
        store.close()
        index.close()
