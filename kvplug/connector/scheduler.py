"""Scheduler half of KVPlugConnector: keys, lookups and per-step transfer plans.

It sees requests, block ids and hashes, never tensors. Per request it keeps the prompt's block
keys, its chunks (blending) and how far saving has got; per step it turns the tier manager's
plans into a KVPlugMetadata for the workers. Lookups have no side effects: vLLM may ask again.

    num_matched(request, num_computed) -> (tokens, load_async)   what kvplug can load or blend
    after_alloc(request, blocks, n_ext)   plan the loads and the blend for the tokens vLLM accepted
    build_meta(scheduler_output)          plan saves of computed prompt blocks and chunks; emit metadata
    restore(handshakes)                   index what every rank found in the tiers at start-up
    on_worker_meta(meta)                  failed loads / refused saves: forget them, save again later;
                                          units a tier lost; blending turned off by the worker's self-test
    loads_landed(req_ids)                 asynchronous loads the workers finished (get_finished)
    finished(request) -> delay_free       forget the request; True while an asynchronous load may
                                          still write its blocks (vLLM frees them once it lands)
    take_stats()                          counters since the last call
    close()                               stop the tiers' scheduler-side views

The tiers are the configured specs (kvplug/tiers/tier.py): lookups ask their scheduler-side views,
from memory (a remote store in one batched round trip), never the file system.

Blending: a prompt's chunks are looked up by key like prefix blocks. The blend span runs from the
end of the prefix hit to the end of the last cached chunk before the first chunk that misses;
vLLM computes everything after it in its own batch, and the worker saves each new chunk's KV from
the paged cache once vLLM has computed it (ChunkSave).
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from functools import partial

from kvplug.blend.cost_gate import CostGate, attention_pairs
from kvplug.blend.guard import QualityGuard
from kvplug.config import KVPlugConfig, request_blend, request_saves
from kvplug.connector.engine_facts import EngineFacts
from kvplug.connector.metadata import BlendPlan, BlockLoad, BlockSave, ChunkRef, ChunkSave, KVPlugMetadata
from kvplug.connector.stats import KVPlugStats
from kvplug.core.chunking import chunk_key, chunker, spans_from_ends
from kvplug.core.hashing import prefix_block_keys
from kvplug.tiers.manager import Quota, SlowTier, TierManager
from kvplug.tiers.tier import CPU, configured_tiers

logger = logging.getLogger("kvplug")

# Attention makes a unit's recompute cost grow with its position; this is the context length at
# which attention costs as much as the unit's own linear layers (a rough, model-independent
# split, used only to rank units for the cost_aware policy).
_ATTN_EQUAL_CONTEXT = 4096
EXPLORE_EVERY = 32


@dataclass
class _Blend:
    ratio: float
    policy: str
    chunks: list[tuple[int, int, bytes | None]]  # (begin, end, key); key None: too short to cache
    done: set[int] = field(default_factory=set)  # chunks cached, claimed or saved: never saved again


@dataclass
class _Request:
    req_id: str
    keys: list[bytes]  # one per full prompt block
    prompt_len: int
    namespace: str  # the tenant (cache_salt) owning the units, for quotas
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # blocks [0, saved_upto) are cached or planned
    blend: _Blend | None = None
    save: bool = True  # kv_transfer_params "save": false keeps the request's KV out of the tiers


@dataclass
class _Claim:
    """A blend span found by num_matched: [start, end), the tier of each claimed cached chunk and
    the cacheable chunks inside it that no tier holds (recomputed in the blend, saved after)."""
    start: int
    end: int
    tiers: dict[int, str]  # chunk index -> tier
    missed: list[int] = field(default_factory=list)
    misses: int = 0  # cacheable chunks no tier holds, in the whole prompt after start
    after_miss_blended: tuple[int, int] = (0, 0)  # cached chunks (and tokens) past a miss, blended
    after_miss: tuple[int, int] = (0, 0)  # cached chunks (and tokens) past a miss, which vLLM prefills
    declined: int = 0  # cached-chunk tokens the cost gate left to vLLM
    explored: bool = False  # claimed although predicted slower, to keep the blend cost measured


def _explores(req_id: str) -> bool:
    """One request in EXPLORE_EVERY, fixed by its id (lookups may repeat), blends even where the gate
    predicts prefilling is faster: so the blend cost stays measured when conditions change."""
    return zlib.crc32(req_id.encode()) % EXPLORE_EVERY == 0


def _step_pairs(so) -> float:
    """Attention pairs of a step's forward pass: each scheduled request's new tokens against its
    computed ones (the cost gate's prefill fit)."""
    new = [(r.req_id, r.num_computed_tokens) for r in so.scheduled_new_reqs]
    cached = so.scheduled_cached_reqs
    return sum(attention_pairs(so.num_scheduled_tokens.get(req, 0), computed)
               for req, computed in new + list(zip(cached.req_ids, cached.num_computed_tokens)))


def _samples(req_id: str, rate: float) -> bool:
    """Whether the quality guard audits this request's blend: a fixed share of request ids."""
    return zlib.crc32(b"audit:" + req_id.encode()) < rate * 2 ** 32


class SchedulerHalf:
    def __init__(self, cfg: KVPlugConfig, facts: EngineFacts, *, load: bool = True, save: bool = True,
                 separator: tuple[int, ...] = ()):
        """load/save: the kv_role - kv_both does both, kv_producer only saves, kv_consumer only loads.
        separator: the token ids of chunk_separator (blending, chunking "separator")."""
        b = cfg.blend
        self._spans = chunker(b.chunking, separator, window=b.content_chunk_window,
                              min_tokens=b.content_chunk_min_tokens, target_tokens=b.content_chunk_target_tokens,
                              max_tokens=b.content_chunk_max_tokens)
        self.cfg, self.facts, self.bs = cfg, facts, facts.block_size
        self._load_enabled, self._save_enabled = load, save
        self._blend_on = cfg.blend.enabled
        tiers = cfg.tiers
        specs = configured_tiers(tiers)
        self._async_tiers = {s.name for s in specs if s.loads_async}
        self.manager = TierManager(
            unit_bytes=facts.unit_bytes,
            cpu_bytes=tiers.cpu_bytes,
            tiers=[SlowTier.of(s, s.index(facts.tp_size), payload_size=partial(facts.stored_bytes, codec=s.codec))
                   for s in specs],
            tp_size=facts.tp_size,
            policy=tiers.eviction_policy,
            quotas={ns: Quota({t: b for t, b in ((CPU, q.cpu_bytes), ("disk", q.disk_bytes)) if b is not None}, q.ttl_s)
                    for ns, q in cfg.namespaces.items()},
        )
        if tiers.cpu_bytes and self.manager.num_slots == 0:
            logger.warning("cpu_bytes=%d holds no %d-byte block (all %d ranks): CPU tier disabled", tiers.cpu_bytes,
                           facts.unit_bytes * facts.tp_size, facts.tp_size)
        self._reqs: dict[str, _Request] = {}
        self._lookups: dict[str, tuple[int, list[str]]] = {}  # req -> (local tokens, tier per hit block)
        self._claims: dict[str, _Claim] = {}
        self._loading: set[str] = set()  # requests with an asynchronous load in flight
        self._fetched: dict[str, int] = {}  # asynchronous blends: ranks whose chunks are in memory
        self._blend_now: list[str] = []  # ... all of them: blended on every rank in the next step
        self.gate = CostGate()  # blend only where it is predicted faster than prefill (blend_cost_gate)
        b = cfg.blend
        self.guard = QualityGuard(b.blend_max_kl) if b.enabled and b.blend_max_kl else None
        self._guard_floor: float | None = None  # a change of the guard's floor, to report as a gauge
        self._meta = KVPlugMetadata()
        self._stats: dict[str, int] = {}

    # ---- start-up ------------------------------------------------------------------------
    def restore(self, handshakes) -> None:
        """Index the units every rank found in the tiers at start-up (KVPlugHandshake per rank):
        a unit counts where every tensor-parallel rank holds its part, oldest first. The scan
        itself ran in the workers (they know the layouts; the scheduler reads no tier)."""
        ranks = list(handshakes)
        for tier in sorted({t for h in ranks for t in h.restored}):
            found: dict[bytes, list] = {}
            for h in ranks:
                r = h.restored.get(tier)
                for key, nbytes, mtime in zip(r.keys, r.nbytes, r.mtimes) if r is not None else ():
                    entry = found.setdefault(key, [0, 0, mtime])
                    entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + nbytes, min(entry[2], mtime)
            units = sorted(((e[2], k, e[1]) for k, e in found.items() if e[0] == self.facts.tp_size))
            kept = self.manager.restore(tier, [k for _, k, _ in units], [n for _, _, n in units])
            logger.info("kvplug: %s tier holds %d unit(s) of this engine's layouts; indexed %d", tier, len(units), kept)

    # ---- requests ------------------------------------------------------------------------
    def _request(self, request) -> _Request:
        st = self._reqs.get(request.request_id)
        if st is None:
            tokens = request.prompt_token_ids or []
            blend = self._blend_params(request)
            # Blocks of a blended request hold blended KV: they are saved and found under their
            # own root (per ratio and policy), never served to a request that asked for exact KV.
            salt = request.cache_salt if blend is None else \
                f"{request.cache_salt or ''}\0blend:{blend.ratio}:{blend.policy}"
            keys = prefix_block_keys(self.facts.namespace, tokens, self.bs, salt)
            st = self._reqs[request.request_id] = _Request(request.request_id, keys, len(tokens),
                                                              request.cache_salt or "", blend=blend,
                                                              save=self._saves(request))
        return st

    def _saves(self, request) -> bool:
        try:
            return request_saves(request.kv_transfer_params)
        except ValueError as e:
            logger.warning("kvplug: request %s: %s; its KV is saved as usual", request.request_id, e)
            return True

    def _blend_params(self, request) -> _Blend | None:
        if not self._blend_on or not self._load_enabled:
            return None
        tokens = request.prompt_token_ids or []
        try:
            b, ends = request_blend(self.cfg.blend, request.kv_transfer_params)
            if b is None:
                return None
            spans = spans_from_ends(ends, len(tokens)) if ends is not None else self._spans(tokens)
        except ValueError as e:
            logger.warning("kvplug: request %s: %s; not blended", request.request_id, e)
            return None
        if not spans:
            return None
        chunks = [(lo, hi, chunk_key(self.facts.namespace, tokens[lo:hi], request.cache_salt)
                   if hi - lo >= b.blend_min_chunk_tokens else None) for lo, hi in spans]
        floor = self.guard.floor if self.guard is not None else 0.0
        return _Blend(max(b.recompute_ratio, floor), b.recompute_policy, chunks)

    def num_matched(self, request, num_computed: int) -> tuple[int, bool]:
        if not self._load_enabled or num_computed % self.bs or request.prompt_token_ids is None:
            return 0, False
        st = self._request(request)
        # vLLM must compute at least the last prompt token itself.
        usable = min(len(st.keys), (st.prompt_len - 1) // self.bs)
        first = num_computed // self.bs
        tiers = self.manager.lookup(st.keys[first:usable])
        self._lookups[request.request_id] = (num_computed, tiers)
        self._claims.pop(request.request_id, None)
        start = num_computed + len(tiers) * self.bs  # the prefix tiers' blocks load first
        claim = self._claim(st, start) if st.blend is not None and self._blend_on else None
        slow = [t for t in tiers if t != CPU]
        if claim is not None:
            self._claims[request.request_id] = claim
        if claim is None or not claim.tiers:
            return len(tiers) * self.bs, self._async(slow)
        return claim.end - num_computed, self._async(slow + [t for t in claim.tiers.values() if t != CPU], blend=True)

    def _async(self, tiers: list[str], blend: bool = False) -> bool:
        """Whether the request's KV arrives through vLLM's asynchronous path: loads from tiers that
        load in the background (a property of each tier) with async_loads, and every blend with
        blend_async (the blend then runs in a later step, from blend_now, while the request waits
        and other requests' steps go on)."""
        return (self.cfg.tiers.async_loads and any(t in self._async_tiers for t in tiers)) or \
            (blend and self.cfg.blend.blend_async)

    def _claim(self, st: _Request, start: int) -> _Claim:
        """The blend span from `start`: it ends after a cached chunk (vLLM computes at least the
        last prompt token); cached chunks past a cacheable one no tier holds are blended too, the
        missing one recomputed in the same pass. The cost gate picks the end (among every cached
        chunk's) that it predicts fastest, or declines it all where prefilling is faster; before
        it has measurements the span stops before the first missing chunk (vLLM prefills from
        there, as without blending); with blend_cost_gate off every cached chunk is claimed."""
        chunks, limit = st.blend.chunks, st.prompt_len - 1
        todo = [i for i, (b, e, key) in enumerate(chunks) if e > start and b < limit and key is not None]
        found = dict(zip(todo, self.manager.lookup_each([chunks[i][2] for i in todo])))
        # Candidate ends: after each cached chunk, with the cached tokens before it and whether a
        # missed chunk lies before it.
        ends, cached, past_miss, n, missed = [], [], [], 0, False
        for i in todo:
            b, e, _ = chunks[i]
            if found[i] is None:
                missed = True
                continue
            n += e - max(b, start)
            if e <= limit:
                ends.append(e)
                cached.append(n)
                past_miss.append(missed)
        if not self.cfg.blend.blend_cost_gate:  # blend every cached chunk, whatever it costs
            return self._claim_to(st, start, ends[-1] if ends else start, found, todo)
        if not self.gate.ready:  # nothing measured yet: vLLM prefills from the first miss on
            before = [e for e, m in zip(ends, past_miss) if not m]
            return self._claim_to(st, start, before[-1] if before else start, found, todo)
        options = [(e - start, round(st.blend.ratio * c) + (e - start - c), ends[-1] - e) for e, c in zip(ends, cached)]
        pick, explored = self.gate.choose(start, options, explore=_explores(st.req_id))
        claim = self._claim_to(st, start, ends[pick] if pick >= 0 else start, found, todo)
        claim.explored = explored
        # What the gate left to vLLM: cached tokens a claim could have covered, beyond the chosen end.
        claim.declined = (cached[-1] - (cached[pick] if pick >= 0 else 0)) if ends else 0
        return claim

    def _claim_to(self, st: _Request, start: int, end: int, found: dict, todo: list[int]) -> _Claim:
        """The claim of [start, end): its cached chunks, the missed ones inside it, and the counts."""
        chunks = st.blend.chunks
        claim = _Claim(start, end, {})
        blended, after, seen_miss = [0, 0], [0, 0], False
        for i in todo:
            b, e, _ = chunks[i]
            tokens = e - max(b, start)
            if found[i] is None:
                claim.misses += 1
                seen_miss = True
                if e <= end:
                    claim.missed.append(i)
            elif e <= end:
                claim.tiers[i] = found[i]
                if seen_miss:
                    blended = [blended[0] + 1, blended[1] + tokens]
            elif seen_miss:
                after = [after[0] + 1, after[1] + tokens]
        claim.after_miss_blended, claim.after_miss = tuple(blended), tuple(after)
        return claim

    def after_alloc(self, request, block_ids: list[int], num_external: int) -> None:
        claim = self._claims.pop(request.request_id, None)
        lookup = self._lookups.pop(request.request_id, None)
        st = self._reqs.get(request.request_id)
        if lookup is None or st is None:
            return
        local, tiers = lookup
        first = local // self.bs
        queried = min(len(st.keys), (st.prompt_len - 1) // self.bs) - first
        n_load = min(-(-num_external // self.bs), len(tiers))
        self._count(lookup_tokens=queried * self.bs, miss_tokens=(queried - n_load) * self.bs)
        if claim is not None:
            if claim.tiers and num_external < claim.end - local:  # vLLM takes all that is offered, or nothing
                claim = _Claim(claim.start, claim.start, {}, misses=claim.misses)
            self._count_claim(claim)
            if not claim.tiers:
                claim = None
        if num_external <= 0:  # vLLM took nothing
            return
        slow = [t for t in tiers[:n_load] if t != CPU] + ([t for t in claim.tiers.values() if t != CPU] if claim else [])
        async_load = self._async(slow, blend=claim is not None)
        if async_load:
            self._meta.async_reqs.append(st.req_id)
            self._loading.add(st.req_id)
        if n_load > 0:
            keys = st.keys[first : first + n_load]
            plan = self.manager.plan_loads(keys, tiers[:n_load], self._costs(first, n_load), st.namespace,
                                           promote=not async_load)
            for i, load in enumerate(plan):
                self._meta.loads.append(BlockLoad(st.req_id, load.key, block_ids[first + i], load.tier, load.slots))
            st.saved_upto = max(st.saved_upto, first + n_load)
        if claim is not None:
            self._plan_blend(request, st, claim, list(block_ids), promote=not async_load)

    def _plan_blend(self, request, st: _Request, claim: _Claim, block_ids: list[int], promote: bool) -> None:
        chunks, refs = st.blend.chunks, []
        loaded = [i for i in sorted(claim.tiers)]
        sizes = [self.facts.chunk_bytes(chunks[i][1] - chunks[i][0]) for i in loaded]
        plan = self.manager.plan_loads([chunks[i][2] for i in loaded], [claim.tiers[i] for i in loaded],
                                       [self._cost(chunks[i][0], chunks[i][1]) for i in loaded], st.namespace,
                                       nbytes=sizes, promote=promote)
        by_index = dict(zip(loaded, zip(plan, sizes)))
        for i, (b, e, key) in enumerate(chunks):
            if b >= claim.end:
                break
            if i in by_index:
                load, nbytes = by_index[i]
                refs.append(ChunkRef(b, e, key, load.tier, load.slots, nbytes))
                st.blend.done.add(i)
            else:
                refs.append(ChunkRef(b, e, key))
        tokens = request.prompt_token_ids
        # The relevance pass runs the question, not the chunks vLLM computes after a missed one:
        # those would cost a forward pass of their own in the step.
        q0 = chunks[-1][1] if chunks and chunks[-1][1] < len(tokens) else claim.end
        q0 = max(q0, claim.end)
        self._meta.blends.append(BlendPlan(st.req_id, list(tokens[:claim.end]), claim.start, claim.end, refs,
                                           st.blend.ratio, st.blend.policy, block_ids, list(tokens[q0:]), q0,
                                           audit=_samples(st.req_id, self.cfg.blend.blend_audit_rate),
                                           tenant=self._tenant(st.namespace)))

    def _tenant(self, salt: str) -> str:
        """A bounded metrics label: a configured namespace, "" without a salt, else "other"."""
        return salt if not salt or salt in self.cfg.namespaces else "other"

    def _count_claim(self, claim: _Claim) -> None:
        self._count(blend_chunk_misses=claim.misses, blend_chunk_hits=len(claim.tiers),
                    blend_chunks_after_miss=claim.after_miss[0], blend_tokens_after_miss=claim.after_miss[1],
                    blend_chunks_after_miss_blended=claim.after_miss_blended[0],
                    blend_tokens_after_miss_blended=claim.after_miss_blended[1],
                    blend_declined_tokens=claim.declined, blend_explored=int(claim.explored))

    # ---- saves ---------------------------------------------------------------------------
    def build_meta(self, so) -> KVPlugMetadata:
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                self._plan_saves(st, new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan_saves(st, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0))
        ops = self.manager.end_step()
        meta, self._meta = self._meta, KVPlugMetadata()
        meta.tier_ops = ops.ops
        meta.blend_now, self._blend_now = self._blend_now, []
        meta.step_tokens = so.total_num_scheduled_tokens
        meta.step_pairs = _step_pairs(so)
        return meta

    def _plan_saves(self, st: _Request, computed: int) -> None:
        if not self._save_enabled or not st.save:
            return
        if st.blend is not None and self._blend_on:
            self._plan_chunk_saves(st, computed)
        full = min(min(computed, st.prompt_len) // self.bs, len(st.keys), len(st.block_ids))
        if full <= st.saved_upto:
            return
        first = st.saved_upto
        by_key = {st.keys[i]: st.block_ids[i] for i in range(first, full)}
        plan = self.manager.plan_saves(st.keys[first:full], self._costs(first, full - first), st.namespace)
        ttl = self.manager.ttls.get(st.namespace, 0.0)
        for save in plan:
            self._meta.saves.append(BlockSave(st.req_id, save.key, by_key[save.key], save.slots, save.tiers, ttl))
        st.saved_upto = full

    def _plan_chunk_saves(self, st: _Request, computed: int) -> None:
        """Chunks this request's forward passes have computed in full (never the blended ones:
        those are cached already and their KV in the engine is blended, not the chunk's own)."""
        have = len(st.block_ids) * self.bs
        ttl = self.manager.ttls.get(st.namespace, 0.0)
        for i, (b, e, key) in enumerate(st.blend.chunks):
            if key is None or i in st.blend.done or e > min(computed, have):
                continue
            st.blend.done.add(i)
            nbytes = self.facts.chunk_bytes(e - b)
            for save in self.manager.plan_saves([key], [self._cost(b, e)], st.namespace, nbytes=[nbytes]):
                self._meta.chunk_saves.append(ChunkSave(st.req_id, key, b, e, st.block_ids[: -(-e // self.bs)],
                                                        save.slots, save.tiers, ttl, nbytes))

    def _costs(self, first: int, n: int) -> list[float]:
        return [self.bs * (1 + (i * self.bs) / _ATTN_EQUAL_CONTEXT) for i in range(first, first + n)]

    def _cost(self, begin: int, end: int) -> float:
        """Recompute cost of tokens [begin, end) in units of a block at position 0."""
        return (end - begin) * (1 + (begin + end) / 2 / _ATTN_EQUAL_CONTEXT)

    # ---- worker feedback -----------------------------------------------------------------
    def on_worker_meta(self, meta) -> None:
        if meta.blend_off and self._blend_on:
            self._blend_on = False
            logger.warning("kvplug: blending is off: %s", meta.blend_off)
        self.on_redo(meta.redo)
        for tier, keys in meta.lost.items():
            self.manager.lost(tier, keys)
        for seconds, tokens, pairs in meta.forward:
            self.gate.observe_prefill(seconds, tokens, pairs)
        for seconds, jobs, span, recomputed, pairs in meta.blends:
            self.gate.observe_blend(seconds, jobs, span, recomputed, pairs)
        if meta.pick_mismatches:
            self._count(blend_pick_mismatches=meta.pick_mismatches)
            logger.error("kvplug: %d blend(s) whose tensor-parallel ranks picked different tokens", meta.pick_mismatches)
        for kl in meta.audits:
            change = self.guard.observe(kl) if self.guard is not None else None
            if change:
                logger.warning("kvplug: %s", change)
                self._guard_floor = self.guard.floor
        for req, ranks in meta.fetched.items():
            self._fetched[req] = self._fetched.get(req, 0) + ranks
            if self._fetched[req] >= self.facts.tp_size:  # every rank has the chunks: blend in lock-step
                del self._fetched[req]
                self._blend_now.append(req)

    def on_redo(self, redo: list[tuple[str, bytes]]) -> None:
        """Units the worker could not load or refused to save: forget them, and save them
        again once vLLM has recomputed them."""
        for req_id, key in redo:
            self.manager.forget(key)
            st = self._reqs.get(req_id)
            if st is None:
                continue
            if key in st.keys:
                st.saved_upto = min(st.saved_upto, st.keys.index(key))
            elif st.blend is not None:
                st.blend.done -= {i for i, c in enumerate(st.blend.chunks) if c[2] == key}

    def loads_landed(self, req_ids) -> None:
        self._loading.difference_update(req_ids or ())

    def finished(self, request) -> bool:
        self._reqs.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)
        self._claims.pop(request.request_id, None)
        return request.request_id in self._loading

    # ---- stats ---------------------------------------------------------------------------
    def _count(self, **counts: int) -> None:
        for k, v in counts.items():
            self._stats[k] = self._stats.get(k, 0) + v

    def take_stats(self) -> KVPlugStats | None:
        self._count(**{k: v for k, v in self.manager.counters.take().items() if k.endswith("_evictions")})
        gauges = {} if self._guard_floor is None else {"blend_guard_ratio": self._guard_floor}
        self._guard_floor = None
        stats, self._stats = KVPlugStats.new(gauges=gauges, **self._stats), {}
        return None if stats.is_empty() else stats

    def close(self) -> None:
        for t in self.manager.tiers.values():
            t.view.close()
