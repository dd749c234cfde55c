"""The serve benchmark's configuration registry: what each server runs (kv_connector_extra_config).

    Plan                        what extra configs are sized from (working sets in bytes, paths)
    ServeConfig                 one configuration: name, group, extra(plan), description, warm-up, fresh pass
    CONFIGS, register(cfg)      the registry (a name once; groups main, eviction, retrieval)
    POLICIES, GROUPS

Groups: "main" and "eviction" run the rag_sessions trace (the configuration and policy tables),
"retrieval" the retrieval trace (serve_retrieval.py). benchmarks/serve.py's docstring describes
every configuration.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

POLICIES = ("lru", "lfu", "fifo", "arc", "s3fifo", "cost_aware")  # kvplug.config.EVICTION_POLICIES (test checks)
GROUPS = ("main", "eviction", "retrieval")  # retrieval: the retrieval trace's own configurations


# ---------------------------------------------------------------- configuration registry
@dataclass(frozen=True)
class Plan:
    """What a configuration's extra config is sized from (bytes, paths)."""
    working_set_bytes: int  # unique prompt KV of the main trace
    evict_working_set_bytes: int  # unique prompt KV of the eviction trace
    work_dir: str
    evict_cpu_frac: float = 0.35
    evict_disk: bool = False
    remote_url: str | None = None  # a redis-server started for the run when a config needs one
    ret_prefix_bytes: int = 0  # the retrieval trace: KV of its prompts' distinct prefixes
    ret_chunk_bytes: int = 0  # the retrieval trace: KV of its distinct documents as chunks


@dataclass(frozen=True)
class ServeConfig:
    name: str
    group: str  # "main" (configuration table), "eviction" (policy table) or "retrieval" (its trace)
    extra: Callable[[Plan], dict | None]  # kv_connector_extra_config; None = vLLM alone
    description: str
    policy: str | None = None
    # Untimed, before the timed trace: "contexts" sends every context of the trace once,
    # "documents" every document once as a chunk (serve_traces.document_warm_prompts).
    prewarm: str | None = None
    fresh_pass: bool = False  # after the trace: the retrieval trace's pass of new documents (TTFT)
    # The retrieval trace's prompts re-joined another way (workloads.retrieval.JOINS: "newlines"
    # replaces the separators with blank lines: no separator for chunking to find). None: as built.
    join: str | None = None


CONFIGS: dict[str, ServeConfig] = {}


def register(cfg: ServeConfig) -> ServeConfig:
    if cfg.group not in GROUPS:
        raise ValueError(f"group={cfg.group!r}: allowed values are {', '.join(GROUPS)}")
    if cfg.prewarm not in (None, "contexts", "documents"):
        raise ValueError(f"prewarm={cfg.prewarm!r}: allowed values are None, contexts, documents")
    if cfg.name in CONFIGS:
        raise ValueError(f"configuration {cfg.name!r} is already registered")
    CONFIGS[cfg.name] = cfg
    return cfg


def _mb(x: float) -> int:
    return int(x) + (16 << 20)  # slack for partial blocks and rounding


def _cpu_all(p: Plan) -> dict:
    return {"cpu_bytes": _mb(1.5 * p.working_set_bytes)}


def _cpu_disk(p: Plan) -> dict:
    return {"cpu_bytes": _mb(0.5 * p.working_set_bytes), "disk_path": f"{p.work_dir}/disk",
            "disk_bytes": _mb(4 * p.working_set_bytes)}


def _evict(policy: str) -> Callable[[Plan], dict]:
    def extra(p: Plan) -> dict:
        cpu = int(p.evict_cpu_frac * p.evict_working_set_bytes)
        out = {"cpu_bytes": cpu, "eviction_policy": policy}
        if p.evict_disk:  # a disk tier too small as well: both tiers evict by the policy
            out.update(disk_path=f"{p.work_dir}/disk", disk_bytes=2 * cpu)
        return out
    return extra


register(ServeConfig("vllm", "main", lambda p: None, "vLLM alone, its prefix caching on"))
register(ServeConfig("kvplug_cpu", "main", _cpu_all, "kvplug CPU tier sized 1.5x the working set"))
register(ServeConfig("kvplug_cpu_disk", "main", _cpu_disk,
                     "kvplug CPU tier 0.5x the working set + disk tier 4x (write-through)"))


def _cpu_remote(p: Plan) -> dict:
    # A fresh namespace per server start: every configuration begins with an empty store.
    return {"cpu_bytes": _mb(0.5 * p.working_set_bytes), "remote_url": p.remote_url,
            "remote_namespace": f"bench-{time.monotonic_ns()}", "remote_timeout_ms": 200}


register(ServeConfig("kvplug_cpu_remote", "main", _cpu_remote,
                     "kvplug CPU tier 0.5x the working set + a Redis remote tier (loopback redis-server)"))


# Blending: the rag_sessions trace places the same document at different positions across
# contexts, which blending reuses and prefix caching cannot. Chunk KV shares the CPU tier with the
# prefix blocks, so the tier gets kvplug_cpu's 1.5x the working set for each kind (3x): every
# block and every distinct document chunk fits, and misses are first sights.
def _blend(policy: str, ratio: float = 0.15) -> Callable[[Plan], dict]:
    def extra(p: Plan) -> dict:
        return {"cpu_bytes": _mb(3.0 * p.working_set_bytes), "blend": True, "recompute_ratio": ratio,
                "recompute_policy": policy}
    return extra


register(ServeConfig("kvplug_blend", "main", _blend("fixed"),
                     "kvplug_cpu + chunk blending, fixed recompute ratio 0.15"))
register(ServeConfig("kvplug_blend_adaptive", "main", _blend("adaptive"),
                     "kvplug_cpu + chunk blending, adaptive recompute budget (ratio 0.15)"))
register(ServeConfig("kvplug_blend_query", "main", _blend("query"),
                     "kvplug_cpu + chunk blending, the default policy (query: what the question reads, ratio 0.15)"))
register(ServeConfig("kvplug_oracle", "main", _cpu_all,
                     "kvplug_cpu with every context of the trace stored beforehand (untimed warm-up pass): "
                     "a perfect cache on this trace", prewarm="contexts"))


# kvplug's own blend defaults (no policy or ratio forced): what `blend: true` gives a user.
def _blend_default(p: Plan, **keys) -> dict:
    return {"cpu_bytes": _mb(3.0 * p.working_set_bytes), "blend": True, **keys}


register(ServeConfig("kvplug_blend_default", "main", _blend_default,
                     "kvplug_cpu + chunk blending with kvplug's default blend settings"))
register(ServeConfig("kvplug_blend_oracle", "main", _blend_default,
                     "kvplug_blend_default with every document of the trace stored beforehand as a chunk, "
                     "in both forms a prompt holds it (untimed warm-up pass, as `kvplug warm --blend`)",
                     prewarm="documents"))
# Issue 18's quality guard, audit rate 0.01 against off (guard_rps_ratio): opt-in through
# --configs, because the key fails start-up on a kvplug without it.
register(ServeConfig("kvplug_blend_audit", "main", lambda p: _blend_default(p, blend_audit_rate=0.01),
                     "kvplug_blend_default with blend_audit_rate 0.01 (issue 18's guard)"))
register(ServeConfig("kvplug_blend_audit_off", "main", lambda p: _blend_default(p, blend_audit_rate=0.0),
                     "kvplug_blend_default with blend_audit_rate 0 (the guard off)"))


# The retrieval trace (serve_retrieval.py): every prompt's blocks are new past the system prompt
# and a repeated first document, so the tiers are sized from its distinct prefixes (offload) and
# documents (chunks). The blend rows get room for prefixes, chunks and the oracle's warm-up
# prefixes (one per document), so both hold everything and share one size.
def _ret_cpu(p: Plan) -> dict:
    return {"cpu_bytes": _mb(1.5 * p.ret_prefix_bytes)}


def _ret_blend(p: Plan) -> dict:
    return {"cpu_bytes": _mb(1.5 * (p.ret_prefix_bytes + 2 * p.ret_chunk_bytes)), "blend": True}


register(ServeConfig("ret_vllm", "retrieval", lambda p: None, "vLLM alone, its prefix caching on",
                     fresh_pass=True))
register(ServeConfig("ret_kvplug_cpu", "retrieval", _ret_cpu,
                     "offload alone: kvplug CPU tier of 1.5x the trace's distinct prefixes", fresh_pass=True))
register(ServeConfig("ret_kvplug_blend", "retrieval", _ret_blend,
                     "offload + blend with kvplug's default blend settings (tier: prefixes and chunks)",
                     fresh_pass=True))
# Issue 21: content-defined chunking against the separator on the same documents, joined by blank
# lines instead of separators (opt-in through --ret-configs); its agreement is against vLLM alone on
# the same blank-line prompts.
register(ServeConfig("ret_vllm_newlines", "retrieval", lambda p: None,
                     "vLLM alone on the trace's prompts joined by blank lines (the content row's reference)",
                     join="newlines"))
register(ServeConfig("ret_kvplug_blend_content", "retrieval", lambda p: {**_ret_blend(p), "chunking": "content"},
                     "ret_kvplug_blend with chunking: content, on the trace's prompts joined by blank lines "
                     "(no separators)", join="newlines"))
register(ServeConfig("ret_kvplug_blend_oracle", "retrieval", _ret_blend,
                     "ret_kvplug_blend with every document of the trace stored beforehand as a chunk "
                     "(untimed warm-up pass: the system prompt and the document)", prewarm="documents"))
for _p in POLICIES:
    register(ServeConfig(f"evict_{_p}", "eviction", _evict(_p),
                         f"kvplug CPU tier a fraction of the working set, eviction_policy={_p}", policy=_p))
