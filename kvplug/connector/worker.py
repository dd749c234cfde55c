"""Worker half of KVPlugConnector: carries out the scheduler's plans on real tensors.

    register(kv_caches)      view each layer's cache block-major; allocate the CPU tier's rows
    load(meta)               before the forward pass: demotions, deletions, loads, then blends
    save(meta)               after the forward pass: copy finished blocks out
    take_load_errors()       GPU block ids whose load failed this step (vLLM recomputes them)
    take_worker_meta()       units to forget and save again: failed loads, refused saves
    take_stats()             counters since the last call
    close()                  drain disk writes
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from vllm.v1.kv_cache_interface import group_kernel_blocks

from kvplug.config import KVPlugConfig
from kvplug.connector.engine_facts import EngineFacts
from kvplug.connector.metadata import KVPlugMetadata, KVPlugWorkerMeta
from kvplug.connector.stats import KVPlugStats
from kvplug.tiers.cpu import BlockRows
from kvplug.tiers.disk import DiskStore

logger = logging.getLogger("kvplug")


class WorkerHalf:
    def __init__(self, cfg: KVPlugConfig, facts: EngineFacts, tp_rank: int, layer_tag: str):
        self.cfg, self.facts, self.tp_rank, self._layer_tag = cfg, facts, tp_rank, layer_tag
        self.caches: list[torch.Tensor] = []
        self.rows: BlockRows | None = None
        self.disk: DiskStore | None = None
        self.remote = None  # RemoteStore when remote_url is configured
        self._errors: set[int] = set()
        self._redo: list[tuple[str, bytes]] = []
        self._stats: dict[str, float] = {}
        self.blender = None  # kvplug.blend.blender.Blender when blending is on

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.facts.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"KVPlugConnector: no KV cache registered for layers {missing[:3]}...")
        self.caches = [group_kernel_blocks(kv_caches[n], self.facts.num_blocks) for n in self.facts.layer_names]
        templates = [(tuple(c.shape[1:]), c.dtype) for c in self.caches]
        device = self.caches[0].device
        n_rows = self.cfg.tiers.cpu_bytes // self.facts.unit_bytes
        self.rows = BlockRows.allocate(templates, n_rows, pin=device.type == "cuda")
        # Which unit each row holds. The scheduler's index should always agree; checking costs
        # nothing and turns any disagreement (e.g. a failed promotion) into a recompute, never
        # wrong KV.
        self._row_keys: list[bytes | None] = [None] * n_rows
        self.layout = f"{self._layer_tag}|{self.rows.layout_tag()}"
        if self.cfg.tiers.disk_path:
            self.disk = DiskStore(Path(self.cfg.tiers.disk_path), self.layout, rank=self.tp_rank,
                                  fsync=self.cfg.tiers.disk_fsync)
        t = self.cfg.tiers
        if t.remote_url:
            from kvplug.tiers.remote import RemoteStore, redact  # redis is only needed when configured

            self.remote = RemoteStore(t.remote_url, self.layout, rank=self.tp_rank, namespace=t.remote_namespace,
                                      ttl_s=t.remote_ttl_s, timeout_s=t.remote_timeout_ms / 1000)
        if self.cfg.blend.enabled:
            self.blender = self._make_blender(kv_caches)
        logger.info("kvplug: %d layers, %d B per block, CPU tier %d blocks (%.2f GB), disk tier %s, remote %s",
                    len(self.caches), self.rows.row_bytes, n_rows, n_rows * self.rows.row_bytes / 1e9,
                    t.disk_path or "off", redact(t.remote_url) if t.remote_url else "off")

    # ---- before the forward pass --------------------------------------------------------
    def load(self, meta: KVPlugMetadata) -> None:
        if meta.is_empty():
            return
        start = time.perf_counter()
        for key, slot in meta.disk_ops:  # before the loads and saves below may reuse a demoted slot
            if slot < 0:
                self.disk.delete(key)
            elif self._row_keys[slot] == key:
                self._put(key, self.rows.row(slot).clone(), to_disk=True, to_remote=False)
        # Fetched units first: one promoted into a row this step may also be read from that row
        # by a request planned after the promotion. (Rows read this step are pinned, never reused.)
        for tier in ("disk", "remote"):
            fetched = [(req, key, block, slot) for req, key, block, t, slot in meta.loads if t == tier]
            if fetched:
                self._load_fetched(tier, fetched)
        cpu = []
        for req, key, block, tier, slot in meta.loads:
            if tier == "cpu" and self._row_keys[slot] == key:
                cpu.append((slot, block))
            elif tier == "cpu":
                self._fail(req, key, block)
        self.rows.load([s for s, _ in cpu], self.caches, [b for _, b in cpu])
        self._count(load_bytes=len(cpu) * self.rows.row_bytes, cpu_hit_tokens=len(cpu) * self.facts.block_size)
        if meta.loads:
            self._count(load_seconds=time.perf_counter() - start)
        for plan in meta.blends:
            self._blend(plan)

    # ---- blending -----------------------------------------------------------------------
    def _make_blender(self, kv_caches: dict[str, torch.Tensor]):
        from kvplug.blend.blender import Blender
        from kvplug.blend.store import ChunkStore
        from kvplug.connector.model_adapter import VLLMModelAdapter
        from kvplug.connector.plugin import loaded_model

        model = loaded_model()
        if model is None:
            raise ValueError("blend=true but kvplug did not see the model load: is the kvplug plugin installed "
                             "(pip install kvplug) and VLLM_PLUGINS not excluding it?")
        adapter = VLLMModelAdapter(model, kv_caches)
        kernel_block = next(iter(kv_caches.values())).shape[2]
        if kernel_block != self.facts.block_size:
            raise ValueError(f"blend needs the cache's kernel block size ({kernel_block}) to equal vLLM's block "
                             f"size ({self.facts.block_size})")
        b, t = self.cfg.blend, self.cfg.tiers
        store = ChunkStore((adapter.num_layers, adapter.num_kv_heads, adapter.head_dim), adapter.dtype,
                           cpu_bytes=b.blend_cpu_bytes, disk_root=Path(t.disk_path) / "chunks" if t.disk_path else None,
                           disk_bytes=b.blend_disk_bytes, layout="blend-v1", rank=self.tp_rank)
        return Blender(adapter, store, check_layer=b.blend_check_layer)

    def _blend(self, plan) -> None:
        from kvplug.blend.blender import BlendJob

        start = time.perf_counter()
        bs = self.facts.block_size
        pos = torch.arange(plan.start, plan.end)
        blocks = torch.tensor(plan.block_ids, dtype=torch.long)
        slots = blocks[pos // bs] * bs + pos % bs
        job = BlendJob(plan.tokens, plan.start, plan.end, plan.chunks, slots, plan.ratio, plan.policy, block_table=blocks,
                       tail=plan.tail)
        try:
            r = self.blender.run(job)
        except Exception:  # noqa: BLE001 - a failed blend is recomputed by vLLM, never a dead engine
            logger.exception("kvplug: blending request %s failed; vLLM recomputes its tokens", plan.req_id)
            self._errors.update(plan.block_ids[plan.start // bs:(plan.end - 1) // bs + 1])
            self._count(blend_errors=1)
            return
        self._count(blend_requests=1, blend_tokens=r.tokens, blend_recomputed_tokens=r.recomputed,
                    blend_chunk_hits=r.chunk_hits, blend_chunk_misses=r.chunk_misses,
                    blend_seconds=time.perf_counter() - start)

    def _fail(self, req: str, key: bytes, block: int) -> None:
        self._errors.add(block)
        self._redo.append((req, key))

    def _load_fetched(self, tier: str, loads: list[tuple[str, bytes, int, int]]) -> None:
        store = self.disk if tier == "disk" else self.remote
        payloads = store.get_many([key for _, key, _, _ in loads]) if store is not None else [None] * len(loads)
        found, good = [], []
        for (req, key, block, promote), payload in zip(loads, payloads):
            if promote >= 0:
                self._row_keys[promote] = None  # holds nothing valid unless the copy below happens
            if payload is None or payload.numel() != self.rows.row_bytes:
                self._fail(req, key, block)
                continue
            found.append((block, promote))
            good.append(payload)
            if promote >= 0:
                self._row_keys[promote] = key
        if not found:
            return
        batch = BlockRows(torch.stack(good), self.rows.templates)
        batch.load(list(range(len(found))), self.caches, [b for b, _ in found])
        promoted = [(i, p) for i, (_, p) in enumerate(found) if p >= 0]
        if promoted:
            dst = torch.tensor([p for _, p in promoted])
            self.rows.buffer.index_copy_(0, dst, batch.buffer[[i for i, _ in promoted]])
        self._count(load_bytes=len(found) * self.rows.row_bytes, **{f"{tier}_hit_tokens": len(found) * self.facts.block_size})

    # ---- after the forward pass ---------------------------------------------------------
    def save(self, meta: KVPlugMetadata) -> None:
        if not meta.saves:
            return
        if self._errors:
            # This step's forward attended to blocks that failed to load: its KV is wrong.
            self._redo += [(req, key) for req, key, *_ in meta.saves]
            return
        start = time.perf_counter()
        to_rows = [(slot, block) for _, _, block, slot, *_ in meta.saves if slot >= 0]
        self.rows.store([s for s, _ in to_rows], self.caches, [b for _, b in to_rows])
        direct = [(block, d, r) for _, _, block, slot, d, r, _ in meta.saves if slot < 0 and (d or r)]
        staging = BlockRows.allocate(self.rows.templates, len(direct))
        staging.store(list(range(len(direct))), self.caches, [b for b, _, _ in direct])
        n_direct = 0
        for _, key, _, slot, to_disk, to_remote, ttl in meta.saves:
            if slot >= 0:
                self._row_keys[slot] = key
                if to_disk or to_remote:
                    # The row can be reused by a later step before the write ends: write a copy.
                    self._put(key, self.rows.row(slot).clone(), to_disk, to_remote, ttl)
            elif to_disk or to_remote:
                self._put(key, staging.row(n_direct), to_disk, to_remote, ttl)
                n_direct += 1
        self._count(saved_blocks=len(meta.saves), save_bytes=len(meta.saves) * self.rows.row_bytes,
                    save_seconds=time.perf_counter() - start)

    def _put(self, key: bytes, payload: torch.Tensor, to_disk: bool, to_remote: bool, ttl: float = 0.0) -> None:
        """Queue asynchronous writes; the stores only read `payload`, which nobody modifies."""
        if to_disk and self.disk is not None:
            self.disk.put(key, payload)
        if to_remote and self.remote is not None:
            self.remote.put(key, payload, ttl_s=ttl or None)

    # ---- reporting ----------------------------------------------------------------------
    def take_worker_meta(self) -> KVPlugWorkerMeta | None:
        redo, self._redo = self._redo, []
        return KVPlugWorkerMeta(redo) if redo else None

    def take_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        if errors:
            self._count(load_errors=len(errors))
        return errors

    def _count(self, **counts: float) -> None:
        for k, v in counts.items():
            self._stats[k] = self._stats.get(k, 0) + v

    def take_stats(self) -> KVPlugStats | None:
        if self.disk is not None:
            d = self.disk.stats.take()
            self._count(disk_write_bytes=d.bytes_written, disk_read_bytes=d.bytes_read, disk_corrupt=d.corrupt,
                        disk_write_errors=d.write_errors)
        if self.remote is not None:
            r = self.remote.stats.take()
            self._count(remote_write_bytes=r.bytes_written, remote_read_bytes=r.bytes_read,
                        remote_errors=r.timeouts + r.write_errors + r.dropped, remote_corrupt=r.corrupt)
        if self.blender is not None:  # chunk files are disk files too
            self._count(disk_corrupt=self.blender.store.take_stats()["corrupt"])
        stats, self._stats = KVPlugStats.new(**self._stats), {}
        return None if stats.is_empty() else stats

    def close(self) -> None:
        if self.blender is not None:
            self.blender.store.close()
        for store in (self.disk, self.remote):
            if store is not None:
                store.flush()
                store.close()
