"""What the scheduler half tells the worker half for one engine step (serialisable: only
ints, bools and bytes). The worker runs the lists in field order; see tiers/manager.py for
why that order is safe."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class BlendPlan:
    """One request to blend: write positions [start, end) from its chunks (see kvplug/blend/blender.py)."""
    req_id: str
    tokens: list[int]  # the prompt up to the end of its last chunk
    start: int  # vLLM's own prefix-cache hit: positions before it are in its cache already
    end: int
    chunks: list[tuple[int, int, bytes | None]]  # (begin, stop, key); key None: too short to cache
    ratio: float
    policy: str
    block_ids: list[int] = field(default_factory=list)  # the request's blocks, from position 0
    tail: list[int] = field(default_factory=list)  # the question after the span (adaptive policy)


@dataclass
class KVPlugMetadata(KVConnectorMetadata):
    # In order: (key, cpu slot) writes the slot to disk, (key, -1) deletes the key's file (StepOps)
    disk_ops: list[tuple[bytes, int]] = field(default_factory=list)
    # (request id, key, gpu block, source tier "cpu"|"disk"|"remote",
    #  cpu: the source slot; disk/remote: the CPU slot to promote into, or -1)
    loads: list[tuple[str, bytes, int, str, int]] = field(default_factory=list)
    # (request id, key, gpu block, cpu slot or -1, write to disk, write to remote,
    #  remote TTL in seconds: the tenant's own, or 0 for the store's default)
    saves: list[tuple[str, bytes, int, int, bool, bool, float]] = field(default_factory=list)
    blends: list[BlendPlan] = field(default_factory=list)  # run after the loads

    def is_empty(self) -> bool:
        return not (self.disk_ops or self.loads or self.saves or self.blends)


@dataclass
class KVPlugWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: units to forget and save again once vLLM has recomputed
    them - loads that failed, and every save of a step in which a load failed (its forward
    pass attended to unloaded blocks, so none of its KV may be kept)."""

    redo: list[tuple[str, bytes]] = field(default_factory=list)  # (request id, key)

    def aggregate(self, other: "KVPlugWorkerMeta") -> "KVPlugWorkerMeta":
        # Tensor-parallel ranks report the same units; keep each (request, key) once.
        seen = set(self.redo)
        self.redo += [r for r in other.redo if r not in seen]
        return self
