"""kvplug's counters, carried by vLLM's KVConnectorStats to its log line and Prometheus.

Both halves report: the scheduler its hits, misses and evictions; the worker bytes moved,
time spent and errors. vLLM aggregates the two per step. Each tier's counters are named
<tier>_<counter>: every tier has hit_tokens and evictions, and its spec adds its own (COUNTERS).

    fields()                    every counter name -> meaning (FIELDS and each registered tier's)
    KVPlugStats.new(**counts)   a stats object with the given counters
    aggregate / reduce / reset / is_empty   the KVConnectorStats contract
    KVPlugPromMetrics           one Prometheus counter `vllm:kvplug_<name>` per field
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvplug.tiers.tier import tier_class, tier_names

FIELDS = {
    "lookup_tokens": "prompt tokens (beyond vLLM's own prefix cache) looked up in kvplug's tiers",
    "cpu_hit_tokens": "tokens loaded from the CPU tier instead of recomputed",
    "miss_tokens": "looked-up tokens that no tier held",
    "cpu_evictions": "units evicted from the CPU tier",
    "saved_blocks": "KV blocks saved to a tier",
    "saved_chunks": "chunks vLLM computed whose KV was saved for blending (from the paged cache)",
    "load_bytes": "bytes copied into vLLM's KV cache from kvplug's tiers",
    "save_bytes": "bytes copied out of vLLM's KV cache into kvplug's tiers",
    "load_seconds": "seconds spent loading KV before forward passes (the blends they feed count in blend_seconds)",
    "save_seconds": "seconds spent saving KV after forward passes (blocks and chunks)",
    "chunk_save_seconds": "of which saving chunks (read from the paged cache, packed, queued for the tiers)",
    "load_errors": "blocks that could not be loaded (recomputed instead)",
    "blend_requests": "requests whose chunk KV was blended instead of computed",
    "blend_tokens": "prompt tokens written by blending (cached chunks and their recomputed tokens)",
    "blend_recomputed_tokens": "blended tokens recomputed through the model (picked, or of chunks too short to cache)",
    "blend_chunk_hits": "chunks whose cached KV was blended",
    "blend_chunk_misses": "chunks no tier held (vLLM computes them, kvplug saves them)",
    "blend_chunks_after_miss": "cached chunks after a missed one that vLLM prefilled (not blended)",
    "blend_tokens_after_miss": "tokens of those chunks",
    "blend_chunks_after_miss_blended": "cached chunks after a missed one that were blended (the missed one "
                                       "recomputed in the same pass)",
    "blend_tokens_after_miss_blended": "tokens of those chunks",
    "blend_declined_tokens": "cached-chunk tokens the cost gate left to vLLM's prefill (predicted faster)",
    "blend_explored": "claims blended although the cost gate predicted prefill faster (to keep its blend "
                      "timings current)",
    "blend_batches": "blend batches run (every blend ready in a step runs as one batch)",
    "blend_errors": "blends that failed (their tokens were recomputed by vLLM)",
    "blend_seconds": "seconds spent blending before forward passes",
}
# Every tier's own, besides its spec's COUNTERS.
TIER_FIELDS = {
    "hit_tokens": "tokens loaded from the {tier} tier instead of recomputed (a failed read counts in load_errors)",
    "evictions": "units evicted (deleted) from the {tier} tier by the eviction policy (none where the store "
                 "keeps its own capacity)",
}


def fields() -> dict[str, str]:
    out = dict(FIELDS)
    for name in tier_names():
        counters = {**TIER_FIELDS, **tier_class(name).COUNTERS}
        out.update({f"{name}_{k}": doc.format(tier=name) for k, doc in counters.items()})
    return out


@dataclass
class KVPlugStats(KVConnectorStats):
    @classmethod
    def new(cls, **counts: float) -> "KVPlugStats":
        unknown = set(counts) - set(FIELDS)
        unknown = unknown and unknown - set(fields())
        if unknown:
            raise ValueError(f"unknown kvplug counters {sorted(unknown)}")
        return cls(data={k: v for k, v in counts.items() if v})

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KVPlugStats":
        for k, v in (other.data or {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVPlugPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._labels, self._values = labelnames, per_engine_labelvalues
        self._counters: dict[tuple[int, str], Any] = {}
        self._names: set[str] = set()
        for name, doc in fields().items():
            self._add(name, doc)

    def _add(self, name: str, doc: str) -> None:
        self._names.add(name)
        counter = self._counter_cls(name=f"vllm:kvplug_{name}", documentation=doc, labelnames=self._labels)
        for engine, values in self._values.items():
            self._counters[(engine, name)] = counter.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            if name not in self._names:
                # A tier registered only in the engine's processes (not in this one): its counters
                # appear with their first values.
                self._add(name, f"kvplug counter {name}")
            counter = self._counters.get((engine_idx, name))
            if counter is not None and value > 0:
                counter.inc(value)
