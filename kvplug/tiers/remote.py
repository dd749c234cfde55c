"""Remote tier over the Redis protocol (Redis, Valkey and their clusters): engines on many machines share KV.

A unit of one tensor-parallel rank is one Redis string at redis_key(namespace, key, rank) =
f"{namespace}:{key.hex()}:r{rank}", and its value is byte for byte the disk tier's unit file
(kvplug.tiers.disk_format: header + payload with CRC-32s), so a unit moves between tiers unchanged and
every read is verified (format, checksums, key and layout) before it is trusted.

The remote server is optional: no read path raises for a network problem. A timeout or connection error
is a miss, and opens a circuit breaker that makes every call a miss, without touching the network, for
backoff_s; the next call after that tries again, and the first success closes it. One warning is logged
per outage (logger "kvplug"), and one info line when the server is back. redis-py's pool replaces dead
connections, and each call retries once on a connection error, so a restarted server is picked up
without a new object.

URLs: redis://host:port/db, rediss:// (TLS), unix:///path.sock, and redis+cluster:// or
rediss+cluster:// (or cluster=True) for Redis Cluster through redis.cluster.RedisCluster; valkey:// and
valkeys:// are accepted as aliases of redis:// and rediss://. In a cluster a batch takes one round trip
per node that holds some of its keys.

redis_key(namespace, key, rank) -> str         the Redis key of one unit
parse_url(url, cluster=False) -> (url, bool)   validate a url; whether it names a cluster
make_client(url, timeout_s, cluster=False)     redis.Redis or RedisCluster with bounded timeouts
encode_value(key, layout, payload) -> bytearray    the stored value (disk-tier file bytes) of a unit
decode_value(value, key, layout) -> Tensor         its payload, or CorruptUnit

RemoteStore(url, layout, rank=0, namespace="kvplug", ttl_s=0, timeout_s=0.05, codec=None, ...) (worker side of
the tier "remote", kvplug/tiers/remote_tier.py; `layout` is the default layout tag, a call may name another;
`codec`, a kvplug.tiers.codec.UnitCodec, compresses values in the writer thread and restores them on read):
    put(key, payload, ttl_s=None, layout=None)  queue a SET of a contiguous CPU uint8 tensor; returns at once
    get(key, layout=None)  the payload tensor or None; bad values are deleted, errors are misses, never raised
    get_many(keys, layout=None)  list of tensors/None in one round trip (one pipeline of GETs)
    lookup(keys) / put_many(units) / delete_many(keys) / take_lost() / take_stats()   the Tier interface
                         (take_lost is always empty: lookups ask the store itself)
    delete(key)          queue a DEL, ordered after earlier puts of the same store
    flush()              block until every queued op is done
    close()              flush, stop the writer thread and close the connections
    stats                a RemoteStats; stats.take() returns and resets the counts since the last take
RemoteIndex(url, namespace="kvplug", timeout_s=0.05, ...) (scheduler side, keys only, no tensors):
    exists_many(keys, ranks)  per key, whether all `ranks` units exist: one round trip, all False on error
    healthy              False while the circuit breaker is open
    close()              close the connections
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

import redis  # redis-py, a dependency of kvplug; only this module imports it
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from kvplug.tiers.counters import Counters
from kvplug.tiers.disk_format import KEY_BYTES, CorruptUnit, checksum, decode_unit, encode_header
from kvplug.tiers.tier import Unit
from kvplug.tiers.writer import PUT, AsyncWriter

logger = logging.getLogger("kvplug")

_SCHEMES = {"redis": ("redis", False), "rediss": ("rediss", False), "unix": ("unix", False),
            "valkey": ("redis", False), "valkeys": ("rediss", False),
            "redis+cluster": ("redis", True), "rediss+cluster": ("rediss", True),
            "valkey+cluster": ("redis", True), "valkeys+cluster": ("rediss", True)}

# Deletes a value only if it is still the one that was found bad: another engine may have written a
# good unit under the same key since we read it.
_DELETE_IF_SAME = """
local v = redis.call('GET', KEYS[1])
if v and redis.sha1hex(v) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _check_key(key) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {key!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_seconds(name: str, value, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name} must be a number {'>' if positive else '>='} 0, got {value!r}")


def redis_key(namespace: str, key: bytes, rank: int) -> str:
    _check_key(key)
    return f"{namespace}:{key.hex()}:r{rank}"


def parse_url(url: str, cluster: bool = False) -> tuple[str, bool]:
    """(the url as redis-py spells it, whether it names a cluster); ValueError if it is not one of ours."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"remote url must look like redis://host:port/db, got {url!r}")
    scheme, rest = url.split("://", 1)
    if scheme.lower() not in _SCHEMES:
        raise ValueError(f"remote url scheme {scheme!r} is not one of {sorted(_SCHEMES)}")
    base, url_cluster = _SCHEMES[scheme.lower()]
    cluster = bool(cluster) or url_cluster
    if cluster and base == "unix":
        raise ValueError("Redis Cluster cannot be reached through a unix socket url")
    return f"{base}://{rest}", cluster


def make_client(url: str, timeout_s: float, cluster: bool = False):
    """A client whose every socket connect/read/write waits at most timeout_s, with one retry on a
    connection error (a pooled connection that died with a restarted server) and none on a timeout.
    A cluster client connects (and may raise a redis error) here; a plain one on first use."""
    url, cluster = parse_url(url, cluster)
    retry = Retry(NoBackoff(), 1, (redis.ConnectionError,))
    opts = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=retry)
    if cluster:
        return RedisCluster.from_url(url, **opts)
    # retry_on_error: redis-py 5 retries only the errors listed there, whatever `retry` says.
    return redis.Redis.from_url(url, retry_on_error=[redis.ConnectionError], **opts)


class CircuitBreaker:
    """After a failure, say "do not try" for backoff_s; log once per outage. Thread-safe."""

    def __init__(self, what: str, backoff_s: float):
        self.what, self.backoff_s = what, backoff_s
        self._lock = threading.Lock()
        self._open_until = 0.0
        self.down = False  # a failure happened and no success since: the outage is already logged

    def allow(self) -> bool:
        return time.monotonic() >= self._open_until

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._open_until = time.monotonic() + self.backoff_s
            first, self.down = not self.down, True
        if first:
            logger.warning("kvplug remote tier: %s unreachable (%s: %s); every lookup is a miss, "
                           "retrying every %.1f s", self.what, type(exc).__name__, exc, self.backoff_s)

    def succeeded(self) -> None:
        if not self.down:
            return
        with self._lock:
            was, self.down = self.down, False
        if was:
            logger.info("kvplug remote tier: %s reachable again", self.what)


def redact(url: str) -> str:
    """The url without its user:password part, for log lines."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url


class _Remote:
    """A client made on first use (a cluster client connects in its constructor, which may fail)."""

    def __init__(self, url: str, timeout_s: float, cluster: bool):
        parse_url(url, cluster)  # a bad url fails now, not on first use
        self._args = (url, timeout_s, cluster)
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                self._client = make_client(*self._args)
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


@dataclass
class RemoteStats(Counters):
    """Counters of one RemoteStore; only add() and take() touch them, under the lock.

    puts: put() calls; bytes_written: value bytes SET; write_errors: failed SETs/DELs; dropped: puts not
    sent (breaker open, queue full, a unit the codec cannot encode); gets/hits: units asked for and found; bytes_read: value bytes of
    hits; corrupt: bad or foreign values found (deleted); timeouts: reads that failed on the network
    (each unit of a failed batch counts); skipped: units not asked for while the breaker was open;
    deletes: DELs carried out.
    """
    puts: int = 0
    bytes_written: int = 0
    write_errors: int = 0
    dropped: int = 0
    gets: int = 0
    hits: int = 0
    bytes_read: int = 0
    corrupt: int = 0
    timeouts: int = 0
    skipped: int = 0
    deletes: int = 0


def _check_payload(payload) -> None:
    if (not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8
            or payload.device.type != "cpu" or not payload.is_contiguous()):
        desc = (f"{payload.dtype} on {payload.device}, contiguous={payload.is_contiguous()}"
                if isinstance(payload, torch.Tensor) else type(payload).__name__)
        raise ValueError(f"payload must be a contiguous CPU torch.uint8 tensor, got {desc}")


def encode_value(key: bytes, layout: str, payload: torch.Tensor) -> bytearray:
    """The disk-tier file bytes of a unit, built in one buffer (one copy of the payload)."""
    data = payload.reshape(-1).numpy()
    head = encode_header(key, layout, data.nbytes, checksum(data))
    buf = bytearray(len(head) + data.nbytes)
    buf[:len(head)] = head
    buf[len(head):] = memoryview(data).cast("B")
    return buf


def decode_value(value, key: bytes, layout: str) -> torch.Tensor:
    """The payload of a stored value as a new tensor; CorruptUnit unless it is a good unit of key+layout."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CorruptUnit(f"value is a {type(value).__name__}, not a string")
    header, payload = decode_unit(value)
    if header.key != key:
        raise CorruptUnit(f"value holds key {header.key.hex()}, expected {key.hex()}")
    if header.layout != layout:
        raise CorruptUnit(f"value has layout {header.layout!r}, expected {layout!r}")
    out = torch.empty(header.nbytes, dtype=torch.uint8)
    if header.nbytes:
        out.numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
    return out


class RemoteStore:
    """Worker-side remote tier of one rank; see the module docstring for the methods.

    Reads wait at most about 2 x timeout_s per round trip (a connect and a retried connect); the writer
    thread uses write_timeout_s, since sending a unit of a few MB may take longer than a lookup and
    nobody waits for it. Reads and writes share one circuit breaker: one outage, one log line.
    """

    def __init__(self, url: str, layout: str, rank: int = 0, namespace: str = "kvplug",
                 ttl_s: float = 0, timeout_s: float = 0.05, *, cluster: bool = False,
                 write_timeout_s: float = 5.0, backoff_s: float = 5.0,
                 max_pending_bytes: int = 256 << 20, codec=None):
        if not isinstance(layout, str) or not layout:
            raise ValueError(f"layout must be a non-empty str, got {layout!r}")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
        _check_int("rank", rank, 0)
        _check_int("max_pending_bytes", max_pending_bytes, 0)
        _check_seconds("ttl_s", ttl_s, positive=False)
        _check_seconds("timeout_s", timeout_s, positive=True)
        _check_seconds("write_timeout_s", write_timeout_s, positive=True)
        _check_seconds("backoff_s", backoff_s, positive=False)
        self.layout, self.rank, self.namespace = layout, rank, namespace
        self.ttl_s = ttl_s
        self.codec = codec
        self._ttl_ms = max(1, round(ttl_s * 1000)) if ttl_s > 0 else None
        self._reader = _Remote(url, timeout_s, cluster)
        self._writer = _Remote(url, write_timeout_s, cluster)
        self.breaker = CircuitBreaker(f"{redact(url)} (rank {rank})", backoff_s)
        self.stats = RemoteStats()
        self._refused = False  # the server refused a write (e.g. out of memory) and none succeeded since
        # The op is looked up per call, so tests can wrap it.
        self._writes = AsyncWriter(f"kvplug-remote-r{rank}", lambda *op: self._carry_out(*op),
                                  max_pending_bytes, on_bug=lambda: self.stats.add(write_errors=1))

    def _rkey(self, key: bytes) -> str:
        return redis_key(self.namespace, key, self.rank)

    # ---- caller side -------------------------------------------------------------------------

    def put(self, key: bytes, payload: torch.Tensor, ttl_s: float | None = None, layout: str | None = None) -> None:
        """Queue a SET; `payload` is kept by reference, so the caller must not modify it again.
        `ttl_s` overrides the store's expiry for this unit (a tenant's own TTL)."""
        _check_key(key)
        _check_payload(payload)
        self.stats.add(puts=1)
        self._check_open()
        ttl_ms = self._ttl_ms if ttl_s is None else (max(1, round(ttl_s * 1000)) if ttl_s > 0 else None)
        if not self.breaker.allow() or not self._writes.put(key, payload, (ttl_ms, layout or self.layout)):
            self.stats.add(dropped=1)

    def delete(self, key: bytes) -> None:
        _check_key(key)
        self._check_open()
        self._writes.delete(key)

    def get(self, key: bytes, layout: str | None = None) -> torch.Tensor | None:
        """The payload (do not modify it), or None; never raises for a bad value or a network error."""
        return self.get_many([key], layout)[0]

    def get_many(self, keys, layout: str | None = None) -> list[torch.Tensor | None]:
        """get() of every key, with the keys not queued here fetched in one round trip."""
        keys = list(keys)
        for k in keys:
            _check_key(k)
        layout = layout or self.layout
        out: list[torch.Tensor | None] = [None] * len(keys)
        todo = []
        for i, k in enumerate(keys):
            queued, tensor, arg = self._writes.pending_with_arg(k)
            if not queued:
                todo.append(i)
            elif tensor is not None and arg[1] == layout:
                out[i] = tensor
        for i, value in zip(todo, self._fetch([keys[i] for i in todo])):
            if value is not None:
                out[i] = self._decode(keys[i], value, layout)
        self.stats.add(gets=len(keys), hits=sum(t is not None for t in out))
        return out

    # ---- the Tier interface (kvplug/tiers/tier.py) ---------------------------------------------

    def lookup(self, keys) -> list[bool]:
        """Whether this rank's value of each key exists (queued ops first), in one round trip."""
        keys = list(keys)
        out: list[bool | None] = []
        for k in keys:
            _check_key(k)
            queued, tensor = self._writes.pending(k)
            out.append((tensor is not None) if queued else None)
        todo = [i for i, v in enumerate(out) if v is None]
        for i, found in zip(todo, self._exists([keys[i] for i in todo])):
            out[i] = found
        return [bool(v) for v in out]

    def put_many(self, units: list[Unit]) -> None:
        for u in units:
            self.put(u.key, u.payload, u.ttl_s, u.layout)

    def delete_many(self, keys) -> None:
        for key in keys:
            self.delete(key)

    def take_stats(self) -> dict[str, int]:
        return {k: v for k, v in vars(self.stats.take()).items() if not k.startswith("_")}

    def take_lost(self) -> list[bytes]:
        return []

    def flush(self) -> None:
        self._writes.flush()

    def close(self) -> None:
        if self._writes.closed:
            return
        self._writes.close()
        self._reader.close()
        self._writer.close()

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._writes.closed:
            raise RuntimeError(f"RemoteStore of rank {self.rank} is closed")

    # ---- reads -------------------------------------------------------------------------------

    def _fetch(self, keys: list[bytes]) -> list:
        """The stored values (None: absent), or all None when the server cannot be asked."""
        if not keys:
            return []
        if not self.breaker.allow():
            self.stats.add(skipped=len(keys))
            return [None] * len(keys)
        try:
            pipe = self._reader.client().pipeline(transaction=False)
            for k in keys:
                pipe.get(self._rkey(k))
            values = pipe.execute(raise_on_error=False)
        except Exception as e:  # any failure of the remote tier is a miss, never the engine's problem
            self.stats.add(timeouts=len(keys))
            self.breaker.failed(e)
            return [None] * len(keys)
        failed = [v for v in values if isinstance(v, Exception) and not _is_wrong_type(v)]
        if failed:  # a cluster node down while others answered
            self.stats.add(timeouts=len(failed))
            self.breaker.failed(failed[0])
        else:
            self.breaker.succeeded()
        return [None if isinstance(v, Exception) and not _is_wrong_type(v) else v for v in values]

    def _exists(self, keys: list[bytes]) -> list[bool]:
        """EXISTS of each key in one pipeline; every answer False when the server cannot be asked."""
        if not keys:
            return []
        if not self.breaker.allow():
            self.stats.add(skipped=len(keys))
            return [False] * len(keys)
        try:
            pipe = self._reader.client().pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._rkey(k))
            found = pipe.execute()
        except Exception as e:  # a miss, never the engine's problem
            self.stats.add(timeouts=len(keys))
            self.breaker.failed(e)
            return [False] * len(keys)
        self.breaker.succeeded()
        return [bool(f) for f in found]

    def _decode(self, key: bytes, value, layout: str) -> torch.Tensor | None:
        try:
            if isinstance(value, Exception):
                raise CorruptUnit(f"the key holds another type ({value})")
            if self.codec is None:
                out = decode_value(value, key, layout)
            else:
                out = self.codec.decode(decode_value(value, key, self.codec.stored_layout(layout)), layout)
        except CorruptUnit as e:
            self.stats.add(corrupt=1)
            logger.debug("kvplug remote tier: deleting bad value at %s: %s", self._rkey(key), e.reason)
            if not isinstance(value, Exception):
                self._delete_if_same(key, value)
            return None
        self.stats.add(bytes_read=len(value))
        return out

    def _delete_if_same(self, key: bytes, value: bytes) -> None:
        try:
            digest = hashlib.sha1(value).hexdigest()
            self._reader.client().eval(_DELETE_IF_SAME, 1, self._rkey(key), digest)
        except Exception as e:  # best effort: the value expires or is overwritten anyway
            logger.debug("kvplug remote tier: cannot delete %s: %s", self._rkey(key), e)

    # ---- writer thread -----------------------------------------------------------------------

    def _carry_out(self, kind: str, key: bytes, tensor: torch.Tensor | None, arg) -> None:
        ttl_ms, layout = arg if arg is not None else (None, self.layout)
        if not self.breaker.allow():  # the server went away after this op was queued
            self.stats.add(**({"dropped": 1} if kind == PUT else {"write_errors": 1}))
            return
        try:
            client = self._writer.client()
            if kind == PUT:
                if self.codec is not None:
                    tensor, layout = self.codec.encode(tensor, layout), self.codec.stored_layout(layout)
                    if tensor is None:
                        self.stats.add(dropped=1)
                        return
                value = encode_value(key, layout, tensor)
                # A memoryview: redis-py before 8 accepts bytes and memoryview but not bytearray.
                client.set(self._rkey(key), memoryview(value), px=ttl_ms)
                self.stats.add(bytes_written=len(value))
            else:
                client.delete(self._rkey(key))
                self.stats.add(deletes=1)
        except redis.ResponseError as e:  # the server answered no (out of memory, read-only replica)
            self.stats.add(write_errors=1)
            if not self._refused:
                self._refused = True
                logger.warning("kvplug remote tier: %s refused a write: %s", self.breaker.what, e)
            return
        except Exception as e:  # network: stop sending for a while
            self.stats.add(write_errors=1)
            self.breaker.failed(e)
            return
        self._refused = False
        self.breaker.succeeded()


def _is_wrong_type(e: Exception) -> bool:
    return isinstance(e, redis.ResponseError) and str(e).startswith("WRONGTYPE")


class RemoteIndex:
    """Scheduler-side existence checks (no tensors, no side effects); see the module docstring."""

    def __init__(self, url: str, namespace: str = "kvplug", timeout_s: float = 0.05, *,
                 cluster: bool = False, backoff_s: float = 5.0):
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
        _check_seconds("timeout_s", timeout_s, positive=True)
        _check_seconds("backoff_s", backoff_s, positive=False)
        self.namespace = namespace
        self._remote = _Remote(url, timeout_s, cluster)
        self.breaker = CircuitBreaker(f"{redact(url)} (scheduler index)", backoff_s)

    @property
    def healthy(self) -> bool:
        return not self.breaker.down

    def exists_many(self, keys: list[bytes], ranks: int = 1) -> list[bool]:
        """Per key, whether the units of all ranks 0..ranks-1 exist (one pipeline of EXISTS).
        Any error, timeout or open breaker makes every answer False; only bad arguments raise."""
        keys = list(keys)
        for k in keys:
            _check_key(k)
        _check_int("ranks", ranks, 1)
        if not keys or not self.breaker.allow():
            return [False] * len(keys)
        try:
            pipe = self._remote.client().pipeline(transaction=False)
            for k in keys:
                for r in range(ranks):
                    pipe.exists(redis_key(self.namespace, k, r))
            found = pipe.execute()
        except Exception as e:  # the scheduler must go on: a miss
            self.breaker.failed(e)
            return [False] * len(keys)
        self.breaker.succeeded()
        return [all(found[i * ranks:(i + 1) * ranks]) for i in range(len(keys))]

    def close(self) -> None:
        self._remote.close()

    def __enter__(self) -> "RemoteIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
