"""kvplug as an SGLang HiCache storage backend (L3 under SGLang's host pool): the only module that
imports sglang.

    sglang.launch_server ... --enable-hierarchical-cache --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "kvplug",
        "module_path": "kvplug.sglang.backend", "class_name": "KVPlugHiCacheStorage",
        "interface_v1": 1, "disk_path": "/var/cache/kvplug", "disk_bytes": 1e11}'

KVPlugHiCacheStorage(storage_config, kwargs=None) methods (SGLang's HiCacheStorage interface):
    register_mem_pool_host(pool)        bind to the host pool: its layout names every unit
    on_host_pools_registered()          refuse hybrid pool groups (mamba, swa, ...): start-up error
    batch_get_v1(keys, host_indices, extra_info=None) -> list[bool]   pages into the host pool
    batch_set_v1(keys, host_indices, extra_info=None) -> list[bool]   pages from the host pool
    get(key, target_location=None, target_sizes=None) -> Tensor | None
    batch_get(keys, target_locations=None, target_sizes=None) -> list[Tensor | None]
    set(key, value=None, ...) -> bool / batch_set(keys, values=None, ...) -> bool (all stored)
    exists(key) -> bool / batch_exists(keys, extra_info=None) -> int  (leading run of hits)
    batch_exists_v2 / batch_get_v2 / batch_set_v2   hybrid pools: refused at attach; misses if called
    clear() -> bool                     remove this layout's pages from disk and Redis
    get_stats() -> StorageMetrics       SGLang's metrics, with kvplug's counters in `.kvplug`
    close()                             flush queued writes, stop the writer threads
Every I/O method turns an unexpected error into a miss (logged once per method): nothing but a
bad configuration at start-up raises into SGLang.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, PoolTransferResult

from kvplug.sglang.config import parse_extra_config
from kvplug.sglang.keys import PageSpec, UnitKeys, layout_tag, page_spec, unit_layout
from kvplug.sglang.pages import as_payload, page_indices, read_page, write_page
from kvplug.sglang.store import PageStore

logger = logging.getLogger("kvplug")


def _never_raise(miss):
    """An error inside kvplug is a miss for SGLang, logged in full the first time per method."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except Exception:
                if fn.__name__ not in self._errors_logged:
                    self._errors_logged.add(fn.__name__)
                    logger.exception("kvplug SGLang backend: %s failed; answering a miss", fn.__name__)
                self.store.count(errors=1)
                if not callable(miss):
                    return miss
                return miss(args[0] if args else kwargs.get("keys", []))
        return call
    return wrap


def _all_false(keys):
    return [False] * len(keys)


def _all_none(keys):
    return [None] * len(keys)


class KVPlugHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        self.cfg = parse_extra_config(storage_config.extra_config)
        self.storage_config = storage_config
        # A rank-replicated (MLA) model's pages are the same on every rank: one file for all.
        self.rank = 0 if storage_config.is_mla_model else storage_config.tp_rank
        self.store = PageStore(self.cfg, self.rank)
        self.spec: PageSpec | None = None
        self.page_layout: str | None = None
        self._unit_keys: UnitKeys | None = None
        self._errors_logged: set[str] = set()
        self._metrics = storage_config.enable_storage_metrics
        self._prefetch_pgs: list[int] = []
        self._backup_pgs: list[int] = []
        self._prefetch_bw: list[float] = []
        self._backup_bw: list[float] = []

    # ---- set-up ------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.spec = page_spec(mem_pool_host)
        self.page_layout = layout_tag(mem_pool_host, self.storage_config, self.cfg.kvplug.model_id)
        self._unit_keys = UnitKeys(self.cfg.namespace, self.page_layout)
        self.store.bind(unit_layout(self.page_layout, self.cfg.namespace), self.spec.nbytes)
        logger.info("kvplug SGLang backend: pages of %d bytes, layout %s, namespace %r",
                    self.spec.nbytes, self.page_layout, self.cfg.namespace)

    def on_host_pools_registered(self) -> None:
        others = sorted(str(n) for n in getattr(self, "registered_pools", {}) if str(n) != "kv")
        if others:
            raise ValueError(f"kvplug's SGLang backend stores KV pages only; this model also has host "
                             f"pools {', '.join(others)} (hybrid models are not supported)")

    def _ukeys(self, keys: List[str]) -> list[bytes]:
        if self._unit_keys is None:
            raise RuntimeError("no host pool registered: SGLang calls register_mem_pool_host first")
        return self._unit_keys(keys)

    # ---- zero-copy interface -----------------------------------------------------------------

    @_never_raise(_all_false)
    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        t0 = time.perf_counter()
        slots = page_indices(host_indices, len(keys), self.mem_pool_host.page_size)
        if slots is None:
            logger.error("kvplug batch_get_v1: %d keys need %d host slots", len(keys),
                         len(keys) * self.mem_pool_host.page_size)
            return [False] * len(keys)
        out = [p is not None and write_page(self.mem_pool_host, s, p, self.spec)
               for s, p in zip(slots, self.store.get_many(self._ukeys(keys)))]
        self._record(self._prefetch_pgs, self._prefetch_bw, sum(out), t0)
        return out

    @_never_raise(_all_false)
    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        t0 = time.perf_counter()
        slots = page_indices(host_indices, len(keys), self.mem_pool_host.page_size)
        if slots is None:
            logger.error("kvplug batch_set_v1: %d keys need %d host slots", len(keys),
                         len(keys) * self.mem_pool_host.page_size)
            return [False] * len(keys)
        pages = [read_page(self.mem_pool_host, s, self.spec) for s in slots]
        out = self.store.put_many(self._ukeys(keys), pages)
        self._record(self._backup_pgs, self._backup_bw, sum(out), t0)
        return out

    # ---- classic interface -------------------------------------------------------------------

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    @_never_raise(_all_none)
    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        t0 = time.perf_counter()
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        if len(targets) != len(keys):
            return [None] * len(keys)
        out = [_deliver(p, t, self.spec) for p, t in zip(self.store.get_many(self._ukeys(keys)), targets)]
        self._record(self._prefetch_pgs, self._prefetch_bw, sum(t is not None for t in out), t0)
        return out

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    @_never_raise(False)
    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        t0 = time.perf_counter()
        values = list(values) if values is not None else []
        pages = [as_payload(v, self.spec) for v in values]
        if len(pages) != len(keys) or any(p is None for p in pages):
            logger.debug("kvplug batch_set: values are not %d flat pages of %s x %d", len(keys),
                         self.spec.dtype, self.spec.numel)
            return False
        out = self.store.put_many(self._ukeys(keys), pages)
        self._record(self._backup_pgs, self._backup_bw, sum(out), t0)
        return all(out)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    @_never_raise(0)
    def batch_exists(self, keys: List[str], extra_info=None) -> int:
        found = self.store.lookup(self._ukeys(keys))
        return found.index(False) if False in found else len(found)

    # ---- the multi-pool (v2) interface: hybrid models, refused in on_host_pools_registered ------

    def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
        self._v2_called("batch_exists_v2")
        return PoolTransferResult.empty()

    def batch_get_v2(self, transfers, extra_info=None):
        self._v2_called("batch_get_v2")
        return {t.name: [False] * len(t.keys or []) for t in transfers}

    def batch_set_v2(self, transfers, extra_info=None):
        self._v2_called("batch_set_v2")
        return {t.name: [False] * len(t.keys or []) for t in transfers}

    def _v2_called(self, name: str) -> None:
        if name not in self._errors_logged:
            self._errors_logged.add(name)
            logger.error("kvplug SGLang backend: %s (hybrid pools) is not supported; answering misses", name)

    # ---- housekeeping ------------------------------------------------------------------------

    @_never_raise(False)
    def clear(self) -> bool:
        self.store.clear()
        return True

    def get_stats(self):
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:  # a trimmed install (CPU test box) cannot import SGLang's metrics module
            return None
        m = StorageMetrics()
        counters = self.store.take_stats()
        for mine, theirs in ((self._prefetch_pgs, m.prefetch_pgs), (self._backup_pgs, m.backup_pgs),
                             (self._prefetch_bw, m.prefetch_bandwidth), (self._backup_bw, m.backup_bandwidth)):
            theirs.extend(mine)
            mine.clear()
        m.kvplug = counters
        return m

    def take_stats(self) -> dict[str, int]:
        """kvplug's counters since the previous call (get_stats hands the same to SGLang)."""
        return self.store.take_stats()

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        self.store.close()

    def _record(self, pgs: list, bw: list, pages: int, t0: float) -> None:
        if self._metrics and pages:
            pgs.append(pages)
            bw.append(pages * self.spec.nbytes / max(time.perf_counter() - t0, 1e-9) / 1e9)  # GB/s


def _deliver(payload, target, spec: PageSpec):
    """The page for SGLang: copied into `target` (a flat page it allocated) or as a new tensor."""
    if payload is None:
        return None
    if target is None:
        return payload.view(spec.dtype)
    if (not isinstance(target, torch.Tensor) or target.dtype != spec.dtype or target.numel() != spec.numel
            or not target.is_contiguous()):
        return None
    target.view(-1).view(torch.uint8).copy_(payload)
    return target
