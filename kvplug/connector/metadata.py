"""What the scheduler half tells the worker half for one engine step, and back (serialisable:
ints, strings, bytes and lists of them). The worker runs the lists in field order; see
kvplug/tiers/manager.py for why that order is safe.

A unit is a prefix block (one engine block of every layer, opaque engine bytes) or a blend chunk
(its tokens' KV of every layer in kvplug's canonical layout, keys rotated to 0..n-1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorHandshakeMetadata, KVConnectorMetadata,
                                                               KVConnectorWorkerMetadata)

from kvplug.tiers.tier import Restored


@dataclass
class BlockLoad:
    req_id: str
    key: bytes
    block: int  # the engine block to fill
    tier: str  # "cpu" or a configured tier's name (kvplug/tiers/tier.py)
    rows: tuple[int, ...]  # cpu: the source row; other tiers: the row to promote into, or ()


@dataclass
class ChunkRef:
    """One chunk of a blend plan: where it sits in the prompt and where its KV comes from."""
    begin: int
    end: int
    key: bytes | None  # None: too short to cache, always recomputed
    tier: str | None = None  # where a cached chunk comes from ("cpu" or a tier's name); None: recomputed
    # (no tier holds it: the blend computes it in every layer and the scheduler saves it afterwards)
    rows: tuple[int, ...] = ()  # cpu: the source rows; other tiers: the rows to promote into, or ()
    nbytes: int = 0  # payload bytes (this rank)


@dataclass
class BlendPlan:
    """One request to blend: write positions [start, end) from its chunks (kvplug/blend/blender.py)."""
    req_id: str
    tokens: list[int]  # the prompt up to the end of the span
    start: int  # positions before it are in the engine's cache already (vLLM's or kvplug's prefix hit)
    end: int  # the end of the last claimed chunk
    chunks: list[ChunkRef]
    ratio: float
    policy: str
    block_ids: list[int] = field(default_factory=list)  # the request's blocks, from position 0
    tail: list[int] = field(default_factory=list)  # the question (the prompt after the last chunk)
    tail_at: int | None = None  # position of tail[0]; None: end (the question follows the span)
    audit: bool = False  # the quality guard's sample: also compute the span exactly and compare
    tenant: str = ""  # the audit's metrics label (a configured namespace, "other", or "")


@dataclass
class BlockSave:
    req_id: str
    key: bytes
    block: int
    rows: tuple[int, ...]  # the CPU row, or () when the CPU tier cannot hold it
    tiers: tuple[str, ...]  # the other tiers it is written to
    ttl_s: float  # expiry where a tier has one (remote): the tenant's own, or 0 for the store's default


@dataclass
class ChunkSave:
    """A chunk vLLM computed in this request: taken from the paged cache after the forward pass."""
    req_id: str
    key: bytes
    begin: int
    end: int
    block_ids: list[int]  # the request's blocks, from position 0, covering [begin, end)
    rows: tuple[int, ...]
    tiers: tuple[str, ...]
    ttl_s: float
    nbytes: int


@dataclass
class KVPlugMetadata(KVConnectorMetadata):
    # In order: (tier, key, rows) writes the unit held in those CPU rows to the tier, (tier, key, ())
    # deletes it there
    tier_ops: list[tuple[str, bytes, tuple[int, ...]]] = field(default_factory=list)
    loads: list[BlockLoad] = field(default_factory=list)
    blends: list[BlendPlan] = field(default_factory=list)  # run after the loads
    saves: list[BlockSave] = field(default_factory=list)
    chunk_saves: list[ChunkSave] = field(default_factory=list)
    # Requests whose loads (and blend) finish in a later step: reported through get_finished.
    async_reqs: list[str] = field(default_factory=list)
    # Asynchronous requests whose chunks every rank has fetched: blend them now, every rank in this
    # step (blends run vLLM's layers, whose collectives need every tensor-parallel rank).
    blend_now: list[str] = field(default_factory=list)
    step_tokens: int = 0  # tokens vLLM scheduled in this step (the worker times its forward pass)
    step_pairs: float = 0.0  # their attention pairs (kvplug/blend/cost_gate.py)

    def is_empty(self) -> bool:
        return not (self.tier_ops or self.loads or self.saves or self.blends or self.chunk_saves or self.blend_now)


@dataclass
class KVPlugWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: units to forget and save again once vLLM has recomputed
    them - loads that failed, and every save of a step in which a load failed (its forward
    pass attended to unloaded blocks, so none of its KV may be kept); once, that blending is off
    on this worker (its start-up self-test failed); asynchronous blends whose chunks this rank
    has fetched (counted over ranks: the scheduler starts a blend when every rank has them);
    timings for the blend cost gate: forward passes (seconds, tokens, attention pairs) and blend
    batches (seconds, jobs, span tokens, recomputed tokens, their attention pairs); the audited
    blends' KLs (the quality guard); a digest of each blend's picked tokens, compared across ranks
    as the metadata is aggregated; and per tier,
    units it no longer holds although the scheduler's view says so (writes that failed or were
    dropped, units found bad)."""

    redo: list[tuple[str, bytes]] = field(default_factory=list)  # (request id, key)
    blend_off: str = ""  # why blending is off, when it just turned off
    fetched: dict[str, int] = field(default_factory=dict)  # request id -> ranks that fetched its chunks
    forward: list[tuple[float, int, float]] = field(default_factory=list)
    blends: list[tuple[float, int, int, int, float]] = field(default_factory=list)
    audits: list[float] = field(default_factory=list)  # KL of each audited blend (the quality guard)
    # A digest of each blend's picked tokens, by request: every rank must pick the same tokens.
    picks: dict[str, int] = field(default_factory=dict)
    pick_mismatches: int = 0  # blends whose ranks picked different tokens (found by aggregate)
    lost: dict[str, list[bytes]] = field(default_factory=dict)  # tier -> keys

    def aggregate(self, other: "KVPlugWorkerMeta") -> "KVPlugWorkerMeta":
        # Tensor-parallel ranks report the same units; keep each (request, key) once.
        seen = set(self.redo)
        self.redo += [r for r in other.redo if r not in seen]
        self.blend_off = self.blend_off or other.blend_off
        for req, n in other.fetched.items():
            self.fetched[req] = self.fetched.get(req, 0) + n
        # Ranks time the same steps and batches in lock-step: the slowest rank is the step's time.
        self.forward = _slowest(self.forward, other.forward)
        self.blends = _slowest(self.blends, other.blends)
        self.audits = self.audits or other.audits  # every rank computes the same (gathered) logits
        self.pick_mismatches += other.pick_mismatches + sum(
            1 for req, digest in other.picks.items() if self.picks.get(req, digest) != digest)
        self.picks = {**other.picks, **self.picks}
        for tier, keys in other.lost.items():  # a unit one rank lost is lost to all
            self.lost[tier] = self.lost.get(tier, []) + keys
        return self

    def is_empty(self) -> bool:
        return not (self.redo or self.blend_off or self.fetched or self.forward or self.blends or self.audits
                    or self.picks or self.pick_mismatches or self.lost)


def _slowest(a: list[tuple], b: list[tuple]) -> list[tuple]:
    if len(a) != len(b):
        return a or b
    return [x if x[0] >= y[0] else y for x, y in zip(a, b)]


@dataclass
class KVPlugHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler, once at start-up after the caches are registered (vLLM's connector
    handshake): what this rank found in each tier (the units of its own layouts), so the scheduler
    indexes them before the first request without reading the tier itself."""
    rank: int
    restored: dict[str, Restored] = field(default_factory=dict)
