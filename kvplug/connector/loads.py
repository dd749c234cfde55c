"""One request's loads in one step, and the background reader for the tiers beyond the CPU rows.

A LoadJob decides and reports, it never acts on the worker: each call returns an Outcome (blocks
to write, rows to promote into, chunk payloads, failures, counts) that the worker applies.

    LoadJob.split(meta) -> [LoadJob]      the step's block loads and blend plans, per request
    job.read_rows(rows) -> Outcome        the units held in CPU rows (UnitRows): read now, in the
                                          step they were planned for (later steps reuse the rows)
    job.tier_reads() -> {tier: [(key, layout)]}   what must come from the other tiers
                                          (layout None: the store's block layout; "chunk": the chunks')
    job.install(fetched, row_bytes) -> Outcome    those reads' payloads, checked
    job.take_chunk_kv(key, kv, clusters)  a chunk's KV, unpacked by the worker, for the blend
    AsyncLoader(stores)                   submit(reads) -> Future of {(tier, key): payload | None};
                                          read_now(reads) the same, in the caller's thread
The worker blends once every chunk of a job is in memory (asynchronous ones when the scheduler
says every rank has them), in its own thread, so the engine's tensors are only ever written
between forward passes.
"""
from __future__ import annotations

import concurrent.futures as futures
from collections import Counter
from dataclasses import dataclass, field

from kvplug.tiers.tier import CPU


@dataclass
class Outcome:
    """What one step of a job found; the worker carries it out in this field order."""
    row_blocks: list[tuple[int, int]] = field(default_factory=list)  # (CPU row, engine block) to copy
    forget_rows: list[tuple[int, ...]] = field(default_factory=list)  # promotion rows now holding nothing
    payload_blocks: list[tuple[object, int]] = field(default_factory=list)  # (fetched payload, engine block)
    promote: list[tuple[bytes, tuple[int, ...], object, str]] = field(default_factory=list)  # key, rows,
    # payload, "block" | "chunk": stored into those rows under that kind's layout
    chunks: list[tuple[object, object]] = field(default_factory=list)  # (ChunkRef, payload of its size)
    failed: list[tuple[bytes, int]] = field(default_factory=list)  # (key, engine block; -1: a chunk)
    hit_blocks: Counter = field(default_factory=Counter)  # tier -> blocks loaded from it
    load_bytes: int = 0  # block bytes written into the engine's cache (chunk bytes: once blended)


@dataclass
class LoadJob:
    req_id: str
    blocks: list = field(default_factory=list)  # BlockLoad
    blend: object = None  # BlendPlan
    chunk_kv: dict = field(default_factory=dict)  # key -> chunk KV tensor [L, 2, n, KV, D]
    chunk_clusters: dict = field(default_factory=dict)  # key -> its key clusters, when stored with them
    chunk_failures: int = 0
    fetch: futures.Future | None = None
    reported: bool = False  # its blend's chunks are fetched and the scheduler was told

    @staticmethod
    def split(meta) -> list["LoadJob"]:
        jobs: dict[str, LoadJob] = {}
        for load in meta.loads:
            jobs.setdefault(load.req_id, LoadJob(load.req_id)).blocks.append(load)
        for plan in meta.blends:
            jobs.setdefault(plan.req_id, LoadJob(plan.req_id)).blend = plan
        return list(jobs.values())

    def _chunks(self):
        return [c for c in self.blend.chunks if c.key is not None and c.tier is not None] if self.blend else []

    def read_rows(self, rows) -> Outcome:
        out = Outcome()
        for b in (b for b in self.blocks if b.tier == CPU):
            if rows.holds(b.key, b.rows):
                out.row_blocks.append((b.rows[0], b.block))
                out.hit_blocks[CPU] += 1
            else:
                out.failed.append((b.key, b.block))
        out.load_bytes = len(out.row_blocks) * rows.row_bytes
        for c in (c for c in self._chunks() if c.tier == CPU):
            unit = rows.read(c.key, c.rows)
            self._chunk(out, c, None if unit is None else unit.payload)
        return out

    def tier_reads(self) -> dict[str, list[tuple[bytes, str | None]]]:
        reads: dict[str, list[tuple[bytes, str | None]]] = {}
        for b in self.blocks:
            if b.tier != CPU:
                reads.setdefault(b.tier, []).append((b.key, None))
        for c in self._chunks():
            if c.tier != CPU:
                reads.setdefault(c.tier, []).append((c.key, "chunk"))
        return reads

    def install(self, fetched: dict, row_bytes: int) -> Outcome:
        """fetched: {(tier, key): payload or None} for tier_reads()."""
        out = Outcome()
        for b in (b for b in self.blocks if b.tier != CPU):
            if b.rows:
                out.forget_rows.append(b.rows)  # holds nothing valid unless the promotion below happens
            payload = fetched.get((b.tier, b.key))
            if payload is None or payload.numel() != row_bytes:
                out.failed.append((b.key, b.block))
                continue
            out.payload_blocks.append((payload, b.block))
            out.hit_blocks[b.tier] += 1
            if b.rows:
                out.promote.append((b.key, b.rows, payload, "block"))
        out.load_bytes = len(out.payload_blocks) * row_bytes
        for c in (c for c in self._chunks() if c.tier != CPU):
            payload = fetched.get((c.tier, c.key))
            if self._chunk(out, c, payload) and c.rows:
                out.promote.append((c.key, c.rows, payload, "chunk"))
        return out

    def _chunk(self, out: Outcome, ref, payload) -> bool:
        if payload is not None and payload.numel() == ref.nbytes:
            out.chunks.append((ref, payload))
            return True
        out.failed.append((ref.key, -1))
        return False

    def take_chunk_kv(self, key: bytes, kv, clusters) -> None:
        self.chunk_kv[key] = kv
        if clusters is not None:
            self.chunk_clusters[key] = clusters


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
