"""kvplug's counters, carried by vLLM's KVConnectorStats to its log line and Prometheus.

Both halves report: the scheduler its hits, misses and evictions; the worker bytes moved,
time spent and errors. vLLM aggregates the two per step, and sums the workers' reports: with
tensor parallelism the bytes and each tier's store counters (per_rank) come from every rank, every
other counter from rank 0 alone, so the totals add up. Each tier's counters are named
<tier>_<counter>: every tier has hit_tokens and evictions, and its spec adds its own (COUNTERS).

    fields()                    every counter name -> meaning (FIELDS and each registered tier's)
    per_rank(name)              whether every tensor-parallel rank reports the counter (its shard)
    KVPlugStats.new(audits=None, gauges=None, **counts)   a stats object with the given counters
    aggregate / reduce / reset / is_empty   the KVConnectorStats contract
    KVPlugPromMetrics           one Prometheus counter `vllm:kvplug_<name>` per field, the guard's
                                gauge, and the audits (a histogram and counters per tenant)
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
    "blend_pick_mismatches": "blends whose tensor-parallel ranks picked different tokens (must stay 0: their KV "
                             "would be wrong)",
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


def per_rank(name: str) -> bool:
    """Each tensor-parallel rank moves its own shard of every unit: the bytes it copies and its own
    stores' counters are summed over ranks; every other counter counts events the ranks share
    (requests, tokens, hits, seconds of lock-step work) and is reported by rank 0 alone."""
    if name in ("load_bytes", "save_bytes"):
        return True
    return any(name == f"{t}_{c}" for t in tier_names() for c in tier_class(t).COUNTERS)


# Not counters: the blend audits (a list of [tenant, kl, top1 agreement]: a histogram and per-tenant
# counters on /metrics) and the quality guard's recompute-ratio floor (a gauge: the latest value).
AUDITS = "blend_audit"
GAUGES = {"blend_guard_ratio": "the quality guard's floor on the recompute ratio (0: the guard is not raising it)"}
KL_BUCKETS = (0.0001, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class KVPlugStats(KVConnectorStats):
    @classmethod
    def new(cls, audits: list | None = None, gauges: dict | None = None, **counts: float) -> "KVPlugStats":
        unknown = set(counts) - set(FIELDS)
        unknown = (unknown and unknown - set(fields())) | set(gauges or {}) - set(GAUGES)
        if unknown:
            raise ValueError(f"unknown kvplug counters {sorted(unknown)}")
        data = {k: v for k, v in counts.items() if v}
        if audits:
            data[AUDITS] = [list(a) for a in audits]
        data.update(gauges or {})
        return cls(data=data)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KVPlugStats":
        for k, v in (other.data or {}).items():
            if k == AUDITS:
                self.data[k] = self.data.get(k, []) + v
            elif k in GAUGES:
                self.data[k] = v
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(self.data.items()) if k != AUDITS}
        audits = self.data.get(AUDITS)
        if audits:
            out["blend_audits"] = len(audits)
            out["blend_audit_kl_mean"] = round(sum(a[1] for a in audits) / len(audits), 5)
            out["blend_audit_top1"] = round(sum(bool(a[2]) for a in audits) / len(audits), 3)
        return out

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
        self._gauges = {name: self._gauge_cls(name=f"vllm:kvplug_{name}", documentation=doc, labelnames=labelnames,
                                              multiprocess_mode="mostrecent")
                        for name, doc in GAUGES.items()}
        tenant = [*labelnames, "tenant"]
        self._kl = self._histogram_cls(name="vllm:kvplug_blend_audit_kl", labelnames=tenant, buckets=KL_BUCKETS,
                                       documentation="KL(exact || blended) of the next token after the question, "
                                                     "nats, per audited blend (blend_audit_rate)")
        self._audits = self._counter_cls(name="vllm:kvplug_blend_audits", labelnames=tenant,
                                         documentation="blends audited against an exact computation of their span")
        self._agree = self._counter_cls(name="vllm:kvplug_blend_audit_top1_agree", labelnames=tenant,
                                        documentation="audited blends whose next-token top choice equals the exact one")

    def _add(self, name: str, doc: str) -> None:
        self._names.add(name)
        counter = self._counter_cls(name=f"vllm:kvplug_{name}", documentation=doc, labelnames=self._labels)
        for engine, values in self._values.items():
            self._counters[(engine, name)] = counter.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        values = self._values.get(engine_idx, ())
        for name, value in transfer_stats_data.items():
            if name == AUDITS:
                self._observe_audits(value, values)
            elif name in GAUGES:
                self._gauges[name].labels(*values).set(value)
            else:
                if name not in self._names:
                    # A tier registered only in the engine's processes (not in this one): its counters
                    # appear with their first values.
                    self._add(name, f"kvplug counter {name}")
                counter = self._counters.get((engine_idx, name))
                if counter is not None and value > 0:
                    counter.inc(value)

    def _observe_audits(self, audits, values) -> None:
        for tenant, kl, agree in audits:
            self._kl.labels(*values, tenant).observe(kl)
            self._audits.labels(*values, tenant).inc()
            if agree:
                self._agree.labels(*values, tenant).inc()
