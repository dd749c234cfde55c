"""One request's loads in one step, and the background reader for the slow tiers.

    LoadJob.split(meta, worker) -> [LoadJob]   the step's block loads and blend plans, per request
    job.read_rows(worker)        CPU-tier units now: blocks into the engine's cache, chunks into memory
                                 (rows are the scheduler's to reuse after this step)
    job.remote_reads()           {tier: [(key, layout)]}: what must come from disk or the remote store
    job.install(worker)          fetched blocks into the engine's cache (and rows when promoted),
                                 fetched chunks into memory; returns the (key, block) that failed
    AsyncLoader(stores)          submit(reads) -> Future of {(tier, key): payload | None};
                                 read_now(reads) the same, in the caller's thread
A LoadJob never runs the model: the worker blends once install() has put every chunk in memory
(asynchronous ones when the scheduler says every rank has), in its own thread, so the engine's
tensors are only ever written between forward passes.
"""
from __future__ import annotations

import concurrent.futures as futures
from dataclasses import dataclass, field

SLOW_TIERS = ("disk", "remote")


@dataclass
class LoadJob:
    req_id: str
    blocks: list = field(default_factory=list)  # BlockLoad
    blend: object = None  # BlendPlan
    chunk_kv: dict = field(default_factory=dict)  # key -> chunk KV tensor [L, 2, n, KV, D]
    chunk_clusters: dict = field(default_factory=dict)  # key -> its key clusters, when stored with them
    chunk_failures: int = 0
    fetch: futures.Future | None = None
    fetched: dict = field(default_factory=dict)  # (tier, key) -> payload or None
    reported: bool = False  # its blend's chunks are fetched and the scheduler was told

    @staticmethod
    def split(meta, worker) -> list["LoadJob"]:
        jobs: dict[str, LoadJob] = {}
        for load in meta.loads:
            jobs.setdefault(load.req_id, LoadJob(load.req_id)).blocks.append(load)
        for plan in meta.blends:
            jobs.setdefault(plan.req_id, LoadJob(plan.req_id)).blend = plan
        return list(jobs.values())

    def _chunks(self):
        return [c for c in self.blend.chunks if c.key is not None and c.tier is not None] if self.blend else []

    def read_rows(self, worker) -> None:
        rows = worker.rows
        cpu = [b for b in self.blocks if b.tier == "cpu"]
        good = [b for b in cpu if rows.holds(b.key, b.rows)]
        worker.blocks.load([b.rows[0] for b in good], [b.block for b in good])
        for b in cpu:
            if b not in good:
                worker._fail(self.req_id, b.key, b.block)
        worker._count(load_bytes=len(good) * rows.row_bytes, cpu_hit_tokens=len(good) * worker.facts.block_size)
        for c in self._chunks():
            if c.tier == "cpu":
                unit = rows.read(c.key, c.rows)
                self._take_chunk(worker, c, None if unit is None else unit.payload)

    def remote_reads(self) -> dict[str, list[tuple[bytes, str | None]]]:
        reads: dict[str, list[tuple[bytes, str | None]]] = {}
        for b in self.blocks:
            if b.tier in SLOW_TIERS:
                reads.setdefault(b.tier, []).append((b.key, None))  # None: the store's block layout
        for c in self._chunks():
            if c.tier in SLOW_TIERS:
                reads.setdefault(c.tier, []).append((c.key, "chunk"))
        return reads

    def install(self, worker) -> list[tuple[bytes, int]]:
        failed, good, payloads = [], [], []
        for b in self.blocks:
            if b.tier not in SLOW_TIERS:
                continue
            if b.rows:
                worker.rows.forget(b.rows)  # holds nothing valid unless the copy below happens
            payload = self.fetched.get((b.tier, b.key))
            if payload is None or payload.numel() != worker.rows.row_bytes:
                failed.append((b.key, b.block))
                continue
            good.append(b)
            payloads.append(payload)
        if good:
            worker.blocks.load_payloads(payloads, [b.block for b in good])
            for b, payload in zip(good, payloads):
                if b.rows:
                    worker.rows.store(b.key, b.rows, payload, worker.layout)
            tokens = {t: sum(b.tier == t for b in good) * worker.facts.block_size for t in SLOW_TIERS}
            worker._count(load_bytes=len(good) * worker.rows.row_bytes,
                          **{f"{t}_hit_tokens": n for t, n in tokens.items() if n})
        for c in self._chunks():
            if c.tier in SLOW_TIERS:
                payload = self.fetched.get((c.tier, c.key))
                if payload is not None and c.rows:
                    worker.rows.store(c.key, c.rows, payload, worker.chunk_layout)
                self._take_chunk(worker, c, payload)
        return failed

    def _take_chunk(self, worker, ref, payload) -> None:
        if payload is not None and payload.numel() == ref.nbytes and worker.blender is not None:
            n = ref.end - ref.begin
            self.chunk_kv[ref.key] = worker.blender.fmt.kv(payload, n)
            clusters = worker.blender.fmt.clusters(payload, n)
            if clusters is not None:
                self.chunk_clusters[ref.key] = clusters
            worker._count(load_bytes=ref.nbytes)
            return
        self.chunk_failures += 1
        worker._fail(self.req_id, ref.key, -1)


class AsyncLoader:
    def __init__(self, stores: dict):
        self.stores = {t: s for t, s in stores.items() if s is not None}
        self.chunk_layout: str | None = None  # set by the worker once the blender exists
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvplug-load")

    def submit(self, reads) -> futures.Future:
        return self._pool.submit(self.read_now, reads)

    def read_now(self, reads) -> dict:
        out = {}
        for tier, wanted in reads.items():
            store = self.stores.get(tier)
            for layout in {lay for _, lay in wanted}:
                keys = [k for k, lay in wanted if lay == layout]
                got = store.get_many(keys, self.chunk_layout if layout == "chunk" else None) \
                    if store is not None else [None] * len(keys)
                out.update({(tier, k): p for k, p in zip(keys, got)})
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
