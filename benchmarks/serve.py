"""Serving benchmark: a real ``vllm serve`` per configuration, N concurrent streaming clients.

    python benchmarks/serve.py [--quick] [--json PATH] [--concurrency 4] [--configs a,b] [--policies a,b]
                               [--neighbours a,b] [--previous PATH]

Configurations (registry ``CONFIGS``, one fresh server each, the same request trace each):
  main group      vllm: vLLM alone (prefix caching on);
                  kvplug_cpu: kvplug CPU tier (holds the working set);
                  kvplug_cpu_disk: kvplug CPU + disk (CPU tier half the working set, disk the rest);
                  kvplug_cpu_remote: CPU tier half the working set + a Redis remote tier;
                  kvplug_blend: chunk blending (CacheBlend) at a fixed recompute ratio of 0.15,
                  one CPU tier of 3x the working set for prefix blocks and chunks together (every
                  block and every distinct document chunk of the trace fits);
                  kvplug_blend_adaptive: the same with the adaptive (per-chunk, Cache-Craft)
                  recompute budget;
                  kvplug_oracle: the oracle row. kvplug_cpu's tier, and before the timed trace an
                  untimed warm-up pass sends every distinct context of the trace through the
                  server (1 output token each), so every request finds its context stored: a
                  perfect cache on this trace. Each row's share_of_oracle = its requests/s /
                  the oracle's. (A warm-up pass rather than `kvplug warm`: no second engine to
                  start, and it fills whatever tier the server has.)
  eviction group  kvplug with a CPU tier far smaller than the working set, once per
                  ``eviction_policy`` (lru, lfu, fifo, arc, s3fifo, cost_aware), on a prefix of
                  the same trace.
  neighbours      the case in ``serve_neighbours.py``: TTFT of pure CPU-tier hits alone and among
                  slow neighbours (disk/Redis loads, first-seen documents), on kvplug before issue
                  10's restructure (nb_before: git revision 2370964 run side by side; nb_sync:
                  ``async_loads: false``) and after it (nb_after). Its own trace; see that module.

Modes. Each configuration is a fresh server (~40 s to start on 2 shared cores, the first ~2 min
when the page cache is cold), so the number of servers dominates a quick run:
  --quick  16 requests over 8 contexts; main group vllm, kvplug_cpu, kvplug_cpu_disk,
           kvplug_blend, kvplug_blend_adaptive, kvplug_oracle (no remote tier); eviction
           policies lru, s3fifo, cost_aware on the same 16 requests with a CPU tier of 0.5x
           their working set; neighbours nb_before, nb_after at the quick sizes (11 servers;
           not yet timed as a whole: ~14 min estimated on 2 CPU cores, of which the 8 servers of
           the earlier quick run took ~8.5 min).
  full     64 requests; the main group plus kvplug_cpu_remote; all six eviction policies on
           the whole trace with a CPU tier of 0.35x its working set; neighbours nb_before,
           nb_sync, nb_after (16 servers).
``--configs``, ``--policies``, ``--neighbours`` (``''`` skips a group), ``--requests``,
``--evict-requests``, ``--evict-cpu-frac`` and the ``--nb-*`` sizes override either mode.

Previous results: the report reads an earlier report (``--previous``; default the file at
``--json`` if there is one, else ``serve_full.json`` (full) or ``serve.json`` (quick) under
benchmarks/results/) before writing, and prints per configuration requests/s now / then and
(vs vLLM alone) now / then, and says if the workloads differ. The blend and offload
configurations should keep at least their earlier requests/s.

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
counters and hit rates per tier, vLLM's prefix-cache hit rate, ratios vs vLLM alone and the
share of the oracle's requests/s; for blend configurations blended requests, chunk hit rate
(chunk hits / (hits + misses)), recomputed fraction (recomputed tokens / blended tokens) and
blend seconds per blended request. Writes ``benchmarks/results/serve.json`` (the ``quick``
field says which mode; sections "configs", "policies", "neighbours", "previous") and PNG plots
``serve_ttft.png``, ``serve_throughput.png``, ``serve_policies.png``, ``serve_blend.png``
through ``plots.py`` (when the main group ran). Clients and statistics: ``serve_clients.py``;
report and tables: ``serve_report.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_neighbours  # noqa: E402
import serve_report  # noqa: E402
import serving  # noqa: E402
# Re-exported: the clients and statistics lived here before serve_clients.py.
from serve_clients import (LoadSampler, Timed, aggregate, blend_summary, hit_rates,  # noqa: E402,F401
                           itl_from_chunks, kvplug_origin, run_trace, scrape, warm_pass, with_ratios)
from serve_report import print_report  # noqa: E402,F401
from workloads import SEPARATOR, Request  # noqa: E402
from workloads import rag  # noqa: E402
from workloads.text import question  # noqa: E402

BLOCK = 128  # vLLM's CPU block size (tokens)
POLICIES = ("lru", "lfu", "fifo", "arc", "s3fifo", "cost_aware")  # kvplug.config.EVICTION_POLICIES (test checks)
MAIN_FULL = ("vllm", "kvplug_cpu", "kvplug_cpu_disk", "kvplug_cpu_remote", "kvplug_blend", "kvplug_blend_adaptive",
             "kvplug_blend_query", "kvplug_oracle")
MAIN_QUICK = tuple(n for n in MAIN_FULL if n != "kvplug_cpu_remote")  # a Redis server and one more start
POLICIES_QUICK = ("lru", "s3fifo", "cost_aware")  # the best, the baseline and the worst of the long run
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
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
    prewarm: bool = False  # every context of the trace sent once, untimed, before the timed trace


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
register(ServeConfig("kvplug_blend_query", "main", _blend("query"),
                     "kvplug_cpu + chunk blending, the default policy (query: what the question reads, ratio 0.15)"))
register(ServeConfig("kvplug_oracle", "main", _cpu_all,
                     "kvplug_cpu with every context of the trace stored beforehand (untimed warm-up pass): "
                     "a perfect cache on this trace", prewarm=True))
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


def warm_up_prompts(trace: list[Request]) -> list[str]:
    """One prompt per distinct context, in order of first use: the context and a question no
    request asks, so the timed requests reuse exactly what a repeat sighting reuses (the
    context's full blocks) and still compute their own question."""
    seen: dict[str, str] = {}
    for r in trace:
        seen.setdefault(r.session, r.prompt.rsplit(SEPARATOR, 1)[0])
    return [f"{ctx}{SEPARATOR}Question 0: warm-up." for ctx in seen.values()]


# ---------------------------------------------------------------- one configuration
def prewarm(url: str, args, trace: list[Request]) -> dict:
    """The oracle's warm-up pass (untimed), then settled counters so its saves are not charged to the trace."""
    t0 = time.monotonic()
    results = warm_pass(url, args.model, warm_up_prompts(trace), args.concurrency, "warm-up")
    serving.scrape_settled(url, quiet_s=3.0, max_wait_s=20.0)
    return {"requests": len(results), "errors": sum(1 for r in results if r.error), "wall_s": time.monotonic() - t0}


def run_config(cfg: ServeConfig, extra: dict | None, args, trace, env, serve_args, work: Path) -> dict:
    log = work / f"{cfg.name}.log"
    print(f"== {cfg.name}: {cfg.description}; extra_config={extra} (log {log})", flush=True)
    t0 = time.monotonic()
    with serving.start_server(args.model, extra, env, None, log, serve_args, cwd=work) as url:
        start_s = time.monotonic() - t0
        # A short untimed request first: one-time lazy set-up is not charged to the trace.
        serving.stream_request(url, args.model, "Hello, my name is", 2)
        warm_up = prewarm(url, args, trace) if cfg.prewarm else None
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
            "server_start_s": start_s, "counters": counters, "warm_up": warm_up,
            "omp_core_ids": serving.omp_binding(log_text),
            "requests": [{"i": r.index, "start_s": r.start_s, "ttft_s": r.ttft_s, "total_s": r.total_s,
                          "itl_s": itl_from_chunks(r.chunk_times), "n_tokens": r.n_tokens,
                          "prompt_tokens": r.prompt_tokens, "error": r.error} for r in results]}


# ---------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer requests, contexts and servers: main group without kvplug_cpu_remote, "
                        f"eviction policies {','.join(POLICIES_QUICK)} only, neighbours "
                        f"{','.join(serve_neighbours.NB_QUICK)} at small sizes (11 servers)")
    p.add_argument("--json", type=Path, default=RESULTS / "serve.json", help="output JSON")
    p.add_argument("--previous", type=Path, default=None,
                   help="earlier report to compare requests/s with (default: --json if it exists, else "
                        "results/serve_full.json, or results/serve.json with --quick); '' = none")
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
    serve_neighbours.add_args(p)
    p.add_argument("--reserved-cpus", type=int, default=1)
    p.add_argument("--kvplug-rev", default=None,
                   help="run the servers on kvplug as committed at this git revision (default: working tree)")
    return _defaults(p.parse_args(argv), argv)


def _defaults(a, argv):
    """Mode defaults for what the command line left out."""
    a.argv = list(sys.argv[1:] if argv is None else argv)  # in the report: how to run it again
    a.requests = a.requests or (16 if a.quick else 64)
    a.evict_requests = min(a.evict_requests or (16 if a.quick else a.requests), a.requests)
    a.evict_cpu_frac = a.evict_cpu_frac if a.evict_cpu_frac is not None else (0.5 if a.quick else 0.35)
    if a.configs is None:
        a.configs = ",".join(MAIN_QUICK if a.quick else MAIN_FULL)
    if a.policies is None:
        a.policies = ",".join(POLICIES_QUICK if a.quick else POLICIES)
    a.contexts = a.contexts or (8 if a.quick else 16)
    a.max_tokens = a.max_tokens or (16 if a.quick else 32)
    serve_neighbours.finish_args(a)
    if a.previous is None:
        a.previous = a.json if a.json.is_file() else RESULTS / ("serve.json" if a.quick else "serve_full.json")
    elif str(a.previous) in ("", "."):
        a.previous = None
    return a


def selected(args) -> list[ServeConfig]:
    """The main and eviction configurations asked for; vLLM alone must be among them when there
    are any (their ratios are to it). A run of the neighbours case alone needs none."""
    names = [n for n in args.configs.split(",") if n]
    names += [f"evict_{p}" for p in args.policies.split(",") if p]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; registered: {', '.join(CONFIGS)}")
    if names and "vllm" not in names:
        raise SystemExit("the 'vllm' configuration is the reference and must run")
    if not names and not serve_neighbours.selected(args):
        raise SystemExit("nothing to run: --configs, --policies and --neighbours are all empty")
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
    from offload import kv_bytes_per_token
    from transformers import AutoTokenizer

    cfgs, nb_cfgs = selected(args), serve_neighbours.selected(args)
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
    env = server_env(args, work)
    serve_args = ["--enforce-eager", "--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
                  "--enable-prefix-caching", "--seed", "0",
                  "--kv-cache-memory-bytes", str(args.vllm_kv_blocks * BLOCK * per_tok)]
    previous = serve_report.load_previous(args.previous)  # before --json (maybe the same file) is rewritten
    with contextlib.ExitStack() as stack:
        if nb_cfgs or any("remote_url" in (c.extra(plan) or {}) for c in cfgs):
            plan = dataclasses.replace(plan, remote_url=stack.enter_context(serving.redis_server(work / "redis")))
        runs, load = run_all(cfgs, args, trace, plan, env, serve_args, work)
        extra = {"neighbours": run_neighbours(nb_cfgs, args, tok, plan, env, serve_args, work, per_tok)} \
            if nb_cfgs else {}
    report = build_report(args, runs, workload, plan, per_tok, serve_args, time.monotonic() - t_all, load, extra)
    if previous is not None and report["configs"]:
        report["previous"] = serve_report.vs_previous(report["configs"], workload, previous, args.previous)
    return write_and_print(report, args)


def server_env(args, work: Path) -> dict:
    """The servers' environment; sets args.kvplug_source. The working tree goes first on PYTHONPATH:
    the editable install may point at another checkout, whose kvplug the servers would import."""
    from offload import kvplug_source

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE")}
    env = serving.same_cpu_threads_env(env, args.reserved_cpus)
    if args.kvplug_rev is None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env, args.kvplug_source = kvplug_source(args.kvplug_rev, work, env)
    args.kvplug_source["imported_from"] = kvplug_origin(env, work)
    return env


def run_neighbours(nb_cfgs, args, tok, plan, env, serve_args, work, per_tok) -> dict:
    phases, info = serve_neighbours.prepare(args, tok)
    print(f"neighbours: {info['requests_per_phase']} requests per phase, working set "
          f"{info['working_set_tokens']} tokens", flush=True)
    run = serve_neighbours.NbRun(args.model, env, args.kvplug_source, serve_args, work, plan.remote_url,
                                 info["working_set_tokens"] * per_tok, args.concurrency, args.before_rev)
    with LoadSampler() as load:
        section = serve_neighbours.run_case(nb_cfgs, run, phases, info)
    return {**section, "load": load.summary()}


def write_and_print(report: dict, args) -> int:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    if report["configs"]:
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


def build_report(args, runs, workload, plan, per_tok, serve_args, wall_s, load, extra=None) -> dict:
    return serve_report.build(args, runs, workload, plan, per_tok, serve_args, wall_s, load,
                              [c.name for c in selected(args)], extra)


if __name__ == "__main__":
    sys.exit(main())
