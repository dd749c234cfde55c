"""Worker half of KVPlugConnector: carries out the scheduler's plans on real tensors.

    register(kv_caches)      choose the block path from the caches (tiers/block_io.py: canonical
                             tokens through PagedBlockIO on CUDA, opaque engine blocks elsewhere), one
                             log line; allocate the CPU tier's rows; open the configured tiers' stores
                             and find what they hold of this rank's layouts; build the blender (and
                             run vLLM-internals' self-test) when blending is on
    handshake()              what register found in the tiers, for the scheduler (KVPlugHandshake)
    begin_step(meta)         the step's metadata is bound: its forward pass starts being timed
    load(meta)               tier ops, then loads and blends: synchronous ones before the forward
                             pass, asynchronous ones (reads of tiers that load asynchronously) started
                             in the background; each job's Outcome applied here (kvplug/connector/loads.py);
                             every blend ready in the step (synchronous, and asynchronous ones the
                             scheduler names in blend_now) runs as one batch (Blender.run_batch)
    finished_loads()         ids of asynchronous requests whose KV is now in place (get_finished);
                             a blend's fetched chunks are reported to the scheduler, which starts
                             the blend on every rank in the same step
    save(meta)               after the forward pass: finished blocks and new chunks out to the tiers
                             (every chunk of the step in one read of the paged cache)
    take_load_errors()       engine block ids whose load or blend failed (vLLM recomputes them)
    take_worker_meta()       units to forget and save again; units a tier lost; blending turned off
    take_stats()             counters since the last call
    close()                  drain writes, stop the background loader

Units live in CPU rows (kvplug/tiers/cpu.py: a prefix block in one row, a chunk across as many as
its bytes need) and in the configured tiers' stores (kvplug/tiers/tier.py), by tier name. A chunk's
payload is its KV [layers, 2, tokens, kv_heads, head_dim] in the model dtype, keys rotated to
0..n-1. A block's payload is the engine's bytes (opaque path) or its tokens in that same canonical layout (canonical
path); the two have different layout tags, so one path's unit is a miss for the other.
On CUDA a save returns before its rows are filled: puts of those rows to disk or remote wait in
BlockPath until they are (at the latest when the next step starts).
"""
from __future__ import annotations

import logging
import time
import zlib

import torch

from kvplug.config import KVPlugConfig
from kvplug.connector import kv_views, vllm_compat
from kvplug.connector.engine_facts import EngineFacts
from kvplug.connector.loads import AsyncLoader, LoadJob, Outcome
from kvplug.connector.metadata import KVPlugHandshake, KVPlugMetadata, KVPlugWorkerMeta
from kvplug.connector.stats import KVPlugStats, per_rank
from kvplug.tiers.block_io import BlockPath, choose_block_io
from kvplug.tiers.cpu import UnitRows
from kvplug.tiers.manager import cpu_rows
from kvplug.tiers.tier import Unit, configured_tiers
from kvplug.tiers.unit_kinds import CHUNK_PREFIX

logger = logging.getLogger("kvplug")

_PATHS = {"canonical": "blocks as canonical tokens through PagedBlockIO (every layer in one gather/scatter "
                       "launch, pinned rows, side streams), blend writes and reads through PagedKV",
          "opaque": "whole engine blocks as bytes (BlockRows), blend writes through the backend's "
                    "do_kv_cache_update, reads through the probed PagedKVReader"}


class WorkerHalf:
    def __init__(self, cfg: KVPlugConfig, facts: EngineFacts, tp_rank: int, layer_tag: str, io: str = "auto"):
        """io: "auto" (chosen from the caches at register), "opaque" or "canonical" (tests force it)."""
        self.cfg, self.facts, self.tp_rank, self._layer_tag = cfg, facts, tp_rank, layer_tag
        self._io_request = io
        self.caches: list[torch.Tensor] = []
        self.io_kind = ""  # "canonical" | "opaque" once registered
        self.blocks: BlockPath | None = None
        self.rows: UnitRows | None = None
        self.specs = {s.name: s for s in configured_tiers(cfg.tiers)}
        self.stores: dict = {}  # tier name -> its worker-side store (kvplug/tiers/tier.py Tier)
        self._handshake = KVPlugHandshake(tp_rank)
        self._errors: set[int] = set()
        self._redo: list[tuple[str, bytes]] = []
        self._stats: dict[str, float] = {}
        self.blender = None  # kvplug.blend.blender.Blender when blending is on and its self-test passed
        self._blend_off = ""  # why blending turned off, until reported to the scheduler
        self._loader: AsyncLoader | None = None
        self._jobs: dict[str, LoadJob] = {}  # asynchronous loads in flight, by request
        self._fetched: dict[str, LoadJob] = {}  # asynchronous blends with their chunks in memory
        self._done: set[str] = set()  # asynchronous requests whose KV is in place, to report
        self._blend_s = 0.0  # seconds of every blend so far: load_seconds leaves them to blend_seconds
        self._step_t0: float | None = None  # when this step's metadata was bound
        self._step_tokens, self._step_pairs, self._step_kvplug_s = 0, 0.0, 0.0
        self._timed: dict[str, list] = {"forward": [], "blends": []}  # for the scheduler's cost gate
        # Audited blends: (tenant, KL, top-1 agreement) for the stats, their KLs for the scheduler's guard.
        self._audits: list[tuple[str, float, bool]] = []
        self._audit_kls: list[float] = []
        self._picks: dict[str, int] = {}  # request -> digest of its blend's picks (ranks must agree)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.facts.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"KVPlugConnector: no KV cache registered for layers {missing[:3]}...")
        raw = [kv_caches[n] for n in self.facts.layer_names]
        self.caches = [vllm_compat.group_kernel_blocks(c, self.facts.num_blocks) for c in raw]
        io, self.io_kind, why = choose_block_io(raw, self.caches, self.facts.block_size, self._io_request)
        # Opaque bytes differ by attention implementation and ISA (layer tag); canonical tokens do not.
        self.layout = io.layout_tag if self.io_kind == "canonical" else f"{self._layer_tag}|{io.layout_tag}"
        n_rows = cpu_rows(self.cfg.tiers.cpu_bytes, self.facts.unit_bytes, self.facts.tp_size)  # the manager's slots
        self.blocks = BlockPath(io, n_rows, self.layout)
        self.rows = self.blocks.rows
        logger.info("kvplug: KV path %s: %s; %s", self.io_kind, _PATHS[self.io_kind], why)
        codecs, self.kv_views = kv_views.tier_codecs(self.specs, self.io_kind, io, raw, self.facts, self.layout)
        # a tier without a codec is built as any registered tier is: store(layout, rank)
        self.stores = {name: spec.store(self.layout, self.tp_rank, codec=codecs[name]) if name in codecs
                       else spec.store(self.layout, self.tp_rank) for name, spec in self.specs.items()}
        self._loader = AsyncLoader(self.stores)
        if self.cfg.blend.enabled:
            self._make_blender(kv_caches)
        self._restore()
        logger.info("kvplug: %d layers, %d B per block, CPU tier %d rows (%.2f GB), tiers: %s",
                    len(self.caches), io.row_bytes, n_rows, n_rows * io.row_bytes / 1e9,
                    ", ".join(self.stores) or "none beyond CPU")

    def _restore(self) -> None:
        """What each tier holds of this rank's layouts (blocks and, when blending, chunks), found
        once here for the scheduler (handshake); bad units found on the way count as corrupt."""
        layouts = [self.layout] + ([self.chunk_layout] if self.blender is not None else [])
        for name, spec in self.specs.items():
            found = spec.restore(self.stores[name], layouts)
            self._handshake.restored[name] = found
            if found.corrupt:
                self._count(**{f"{name}_corrupt": found.corrupt})

    def handshake(self) -> KVPlugHandshake:
        return self._handshake

    # ---- blending -----------------------------------------------------------------------
    def _make_blender(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from kvplug.blend.blender import Blender
        from kvplug.connector.model_adapter import VLLMModelAdapter
        from kvplug.connector.plugin import loaded_model

        model = loaded_model()
        if model is None:
            raise ValueError("blend=true but kvplug did not see the model load: is the kvplug plugin installed "
                             "(pip install kvplug) and VLLM_PLUGINS not excluding it?")
        adapter = VLLMModelAdapter(model, kv_caches, self.facts.block_size, kv_io=self.io_kind)
        why = vllm_compat.self_test(adapter)
        if why is not None:
            self._blend_off = (f"vLLM {vllm_compat.vllm_version()} does not behave as kvplug's vllm_compat expects "
                               f"(supported: {vllm_compat.SUPPORTED_VLLM}): {why}")
            logger.warning("kvplug: blending is off: %s", self._blend_off)
            return
        b, clusters = self.cfg.blend, self.facts.cluster_tokens
        self.blender = Blender(adapter, check_layer=b.blend_check_layer, head_tokens=b.blend_chunk_head_tokens,
                               cluster_tokens=clusters, cluster_min_tokens=b.blend_cluster_min_tokens)
        self.chunk_layout = (f"{CHUNK_PREFIX}{str(adapter.dtype).removeprefix('torch.')}|L{adapter.num_layers}"
                             f"KV{adapter.num_kv_heads}D{adapter.head_dim}|keys-at-0|c{clusters}")
        self._loader.chunk_layout = self.chunk_layout
        kv_views.add_chunk_view(self.kv_views, self.chunk_layout, self.blender.fmt)

    # ---- before the forward pass --------------------------------------------------------
    def begin_step(self, meta: KVPlugMetadata) -> None:
        self._step_t0, self._step_kvplug_s = time.perf_counter(), 0.0
        self._step_tokens, self._step_pairs = meta.step_tokens, meta.step_pairs

    def load(self, meta: KVPlugMetadata) -> None:
        if meta.is_empty():
            return
        start, blends_before = time.perf_counter(), self._blend_s
        self.blocks.settle()  # last step's deferred puts reach the stores before this step reads them
        self._tier_ops(meta.tier_ops)
        ready = []
        for job in LoadJob.split(meta):
            self._apply(job, job.read_rows(self.rows))  # now: later steps reuse the rows
            if job.req_id in meta.async_reqs:
                job.fetch = self._loader.submit(job.tier_reads())
                self._jobs[job.req_id] = job
            else:
                self._apply(job, job.install(self._loader.read_now(job.tier_reads()), self.rows.row_bytes))
                if job.blend is not None:
                    ready.append(job)
        now = [self._fetched.pop(r) for r in meta.blend_now if r in self._fetched]
        self._blend_jobs(ready + now)
        self._done.update(meta.blend_now)  # blended, or never fetched here: either way, done
        if meta.loads:
            self._count(load_seconds=time.perf_counter() - start - (self._blend_s - blends_before))
        self._step_kvplug_s += time.perf_counter() - start

    def _tier_ops(self, ops) -> None:
        """Demotions and deletes, before the loads and saves of this step may reuse a demoted row."""
        for tier, key, rows in ops:
            store = self.stores.get(tier)
            if store is None:
                continue
            if not rows:
                store.delete_many([key])
            else:
                unit = self.rows.read(key, rows)
                if unit is not None:
                    store.put_many([unit])

    def finished_loads(self) -> set[str]:
        """Install the asynchronous loads whose reads have landed; those with a blend wait for the
        scheduler's blend_now (reported as fetched). Returns the requests whose KV is in place."""
        self.blocks.settle_done()
        for req in [r for r, job in self._jobs.items() if job.fetch.done()]:
            job = self._jobs.pop(req)
            self._apply(job, job.install(job.fetch.result(), self.rows.row_bytes))
            if job.blend is None:
                self._done.add(req)
            else:
                self._fetched[req] = job
        done, self._done = self._done, set()
        return done

    def _apply(self, job: LoadJob, out: Outcome) -> None:
        """A job's Outcome: blocks into the engine's cache (and promoted into rows), chunks
        unpacked for its blend, failures and counts."""
        self.blocks.load([r for r, _ in out.row_blocks], [b for _, b in out.row_blocks])
        for rows in out.forget_rows:
            self.rows.forget(rows)
        self.blocks.load_payloads([p for p, _ in out.payload_blocks], [b for _, b in out.payload_blocks])
        for key, rows, payload, kind in out.promote:
            self.rows.store(key, rows, payload, self.layout if kind == "block" else self.chunk_layout)
        failed, nbytes = list(out.failed), out.load_bytes
        for ref, payload in out.chunks:
            if self.blender is None:
                failed.append((ref.key, -1))
                continue
            n = ref.end - ref.begin
            job.take_chunk_kv(ref.key, self.blender.fmt.kv(payload, n), self.blender.fmt.clusters(payload, n))
            nbytes += ref.nbytes
        for key, block in failed:
            job.chunk_failures += block < 0
            self._fail(job.req_id, key, block)
        bs = self.facts.block_size
        self._count(load_bytes=nbytes, **{f"{t}_hit_tokens": n * bs for t, n in out.hit_blocks.items()})

    def _blend_jobs(self, jobs: list[LoadJob]) -> None:
        """Every blend ready in this step as one batch; a job that cannot run fails alone, a
        batch that fails fails all its jobs: vLLM recomputes their tokens, never a dead engine."""
        if not jobs:
            return
        start = time.perf_counter()
        runnable = [(job, bj) for job in jobs if (bj := self._blend_job(job)) is not None]
        if runnable:
            try:
                reports = self.blender.run_batch([bj for _, bj in runnable])
            except Exception:  # noqa: BLE001 - a failed blend is recomputed by vLLM
                logger.exception("kvplug: a batch of %d blends failed; vLLM recomputes their tokens", len(runnable))
                for job, _ in runnable:
                    self._blend_failed(job)
                reports = []
            pairs = sum(len(r.picked) * bj.start + sum(r.picked) for (_, bj), r in zip(runnable, reports))
            for (job, _), r in zip(runnable, reports):
                self._count(blend_requests=1, blend_tokens=r.tokens, blend_recomputed_tokens=r.recomputed)
                self._picks[job.req_id] = zlib.crc32(torch.tensor(r.picked, dtype=torch.int64).numpy().tobytes())
                if r.kl is not None:
                    self._audits.append((job.blend.tenant, r.kl, r.top1_agree))
                    self._audit_kls.append(r.kl)
            if reports:
                seconds = time.perf_counter() - start
                self._count(blend_seconds=seconds, blend_batches=1)
                self._timed["blends"].append((seconds, len(reports), sum(r.tokens for r in reports),
                                              sum(r.recomputed for r in reports), pairs))
        self._blend_s += time.perf_counter() - start

    def _blend_job(self, job: LoadJob):
        """The blender's job for a load job's plan, or None (counted, its blocks recomputed)."""
        from kvplug.blend.blender import BlendJob

        plan, bs = job.blend, self.facts.block_size
        blocks = torch.tensor(plan.block_ids, dtype=torch.long)
        pos = torch.arange(plan.end)
        all_slots = blocks[pos // bs] * bs + pos % bs
        try:
            if self.blender is None:
                raise RuntimeError(f"blending is off on this worker: {self._blend_off or 'not enabled'}")
            if job.chunk_failures:
                raise RuntimeError(f"{job.chunk_failures} chunk(s) could not be loaded")
            bj = BlendJob(plan.tokens, plan.start, plan.end,
                          [(c.begin, c.end, c.key if c.tier is not None else None) for c in plan.chunks],
                          all_slots[plan.start:], plan.ratio, plan.policy, block_table=blocks, tail=plan.tail,
                          tail_at=plan.tail_at, chunk_kv=job.chunk_kv, prefix_slots=all_slots[:plan.start],
                          chunk_clusters=job.chunk_clusters, audit=plan.audit)
            self.blender.check(bj)
            return bj
        except Exception as e:  # noqa: BLE001
            logger.debug("kvplug: request %s not blended (%s); vLLM recomputes its tokens", plan.req_id, e)
            self._blend_failed(job)
            return None

    def _blend_failed(self, job: LoadJob) -> None:
        plan, bs = job.blend, self.facts.block_size
        self._errors.update(plan.block_ids[plan.start // bs:(plan.end - 1) // bs + 1])
        self._count(blend_errors=1)

    def _fail(self, req: str, key: bytes, block: int) -> None:
        if block >= 0:
            self._errors.add(block)
        self._redo.append((req, key))

    # ---- after the forward pass ---------------------------------------------------------
    def save(self, meta: KVPlugMetadata) -> None:
        self._time_forward()
        if not meta.saves and not meta.chunk_saves:
            return
        if self._errors:
            # This step's forward attended to blocks that failed to load: its KV is wrong.
            self._redo += [(s.req_id, s.key) for s in meta.saves] + [(s.req_id, s.key) for s in meta.chunk_saves]
            return
        start = time.perf_counter()
        self.blocks.settle()
        nbytes = self._save_blocks(meta.saves)
        mid = time.perf_counter()
        nbytes += self._save_chunks(meta.chunk_saves)
        end = time.perf_counter()
        self._count(saved_blocks=len(meta.saves), save_bytes=nbytes, save_seconds=end - start)
        if meta.chunk_saves:
            self._count(chunk_save_seconds=end - mid)

    def _time_forward(self) -> None:
        """The forward pass's seconds (metadata bound -> saves, less kvplug's own work in between)
        against the tokens it ran: the prefill rate of the scheduler's cost gate."""
        if self._step_t0 is not None and self._step_tokens > 0:
            seconds = time.perf_counter() - self._step_t0 - self._step_kvplug_s
            self._timed["forward"].append((seconds, self._step_tokens, self._step_pairs))
        self._step_t0 = None

    def _save_blocks(self, saves) -> int:
        """Blocks into their CPU rows and fresh staging rows; the puts to disk and remote run once
        those rows are filled (at once on CPU)."""
        to_rows = [s for s in saves if s.rows]
        fence = self.blocks.save([s.key for s in to_rows], [s.block for s in to_rows], [s.rows[0] for s in to_rows])
        direct = [s for s in saves if not s.rows and s.tiers]
        staged, staging = self.blocks.save_staged([s.block for s in direct])

        def put_staged():
            for i, s in enumerate(direct):
                self._put(s.key, staging.row(i), self.layout, s.tiers, s.ttl_s)
        if direct:
            self.blocks.later(staged, None, put_staged)
        for s in to_rows:
            if s.tiers:
                # The row can be reused by a later step before the write ends: write a copy.
                self.blocks.later(fence, s.rows, lambda s=s: self._put(
                    s.key, self.rows.copy_row(s.rows[0]), self.layout, s.tiers, s.ttl_s))
        return len(saves) * self.rows.row_bytes

    def _save_chunks(self, saves) -> int:
        """Chunks vLLM computed, out of the paged cache: one read for all of them (keys rotated back
        to 0..n-1), then each packed into its rows and queued for disk / remote."""
        if not saves or self.blender is None:  # only the blender's adapter reads chunks out of the cache
            return 0
        bs = self.facts.block_size
        reads = []
        for s in saves:
            blocks = torch.tensor(s.block_ids, dtype=torch.long)
            pos = torch.arange(s.begin, s.end)
            reads.append((blocks[pos // bs] * bs + pos % bs, s.begin))
        total = 0
        for s, kv in zip(saves, self.blender.read_chunks(reads)):
            payload = self.blender.fmt.pack(kv)
            if payload.numel() != s.nbytes:
                self._redo.append((s.req_id, s.key))
                continue
            if s.rows:
                self.rows.store(s.key, s.rows, payload, self.chunk_layout)
            self._put(s.key, payload, self.chunk_layout, s.tiers, s.ttl_s)
            total += s.nbytes
        self._count(saved_chunks=len(saves))
        return total

    def _put(self, key: bytes, payload: torch.Tensor, layout: str, tiers, ttl: float = 0.0) -> None:
        """Queue asynchronous writes; the stores only read `payload`, which nobody modifies."""
        for tier in tiers:
            if tier in self.stores:
                self.stores[tier].put_many([Unit(key, payload, layout, ttl or None)])

    # ---- reporting ----------------------------------------------------------------------
    def take_worker_meta(self) -> KVPlugWorkerMeta | None:
        redo, self._redo = self._redo, []
        off, self._blend_off = self._blend_off, ""
        fetched = {req: 1 for req, job in self._fetched.items() if not job.reported}
        for req in fetched:
            self._fetched[req].reported = True
        timed, self._timed = self._timed, {"forward": [], "blends": []}
        kls, self._audit_kls = self._audit_kls, []
        picks, self._picks = self._picks, {}
        lost = {name: keys for name, store in self.stores.items() if (keys := store.take_lost())}
        meta = KVPlugWorkerMeta(redo, off, fetched, timed["forward"], timed["blends"], kls, picks, lost=lost)
        return None if meta.is_empty() else meta

    def take_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        if errors:
            self._count(load_errors=len(errors))
        return errors

    def _count(self, **counts: float) -> None:
        for k, v in counts.items():
            self._stats[k] = self._stats.get(k, 0) + v

    def take_stats(self) -> KVPlugStats | None:
        for name, store in self.stores.items():
            self._count(**{f"{name}_{k}": v for k, v in self.specs[name].counters(store.take_stats()).items()})
        if self.tp_rank:  # ranks run in lock-step: events are counted once, on rank 0
            self._stats = {k: v for k, v in self._stats.items() if per_rank(k)}
            self._audits = []
        stats, self._stats = KVPlugStats.new(audits=self._audits, **self._stats), {}
        self._audits = []
        return None if stats.is_empty() else stats

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()
        if self.blocks is not None:
            self.blocks.drain()  # deferred puts reach the stores before they flush
        for store in self.stores.values():
            store.flush()
            store.close()
