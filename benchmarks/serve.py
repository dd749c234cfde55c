"""Serving benchmark: a real ``vllm serve`` per configuration, N concurrent streaming clients.

    python benchmarks/serve.py [--quick] [--json PATH] [--concurrency 4] [--dtype bfloat16|float32]
                               [--traces rag_sessions,retrieval] [--configs a,b] [--policies a,b]
                               [--ret-configs a,b] [--neighbours a,b] [--previous PATH]
    python benchmarks/serve.py --demo                   (make demo: the retrieval trace, 3 servers)
    python benchmarks/serve.py --export-custom DIR      (the traces as vllm bench serve datasets)

Two traces (``--traces``), each with its configurations (registry ``CONFIGS`` in serve_configs.py,
one fresh server each, the same requests each):
  rag_sessions    main group      vllm: vLLM alone (prefix caching on);
                  kvplug_cpu: kvplug CPU tier (holds the working set): offload alone;
                  kvplug_cpu_disk: kvplug CPU + disk (CPU tier half the working set, disk the rest);
                  kvplug_cpu_remote: CPU tier half the working set + a Redis remote tier;
                  kvplug_blend / _adaptive / _query: chunk blending at ratio 0.15 with the fixed
                  (CacheBlend), adaptive (Cache-Craft) and query policies forced, one CPU tier of
                  3x the working set for prefix blocks and chunks together (everything fits);
                  kvplug_blend_default: the same tier with kvplug's default blend settings
                  (nothing forced): offload + blend;
                  kvplug_oracle: the oracle row. kvplug_cpu's tier, and before the timed trace an
                  untimed warm-up pass sends every distinct context of the trace through the
                  server (1 output token each), so every request finds its context stored: a
                  perfect cache on this trace. Each row's share_of_oracle = its requests/s /
                  the oracle's. (A warm-up pass rather than `kvplug warm`: no second engine to
                  start, and it fills whatever tier the server has.)
                  kvplug_blend_oracle: kvplug_blend_default with every document stored
                  beforehand as a chunk (warm-up "DOC SEP DOC SEP question" per document, the two
                  forms `kvplug warm --blend` stores);
                  opt-in (--configs): kvplug_blend_audit / kvplug_blend_audit_off, blend_audit_rate
                  0.01 / 0 (issue 18's guard_rps_ratio; fails start-up on a kvplug without the key).
                  eviction group: kvplug with a CPU tier far smaller than the working set, once
                  per ``eviction_policy`` (lru, lfu, fifo, arc, s3fifo, cost_aware), on a prefix
                  of the same trace.
  retrieval       a system prompt, the top-k documents of 200 retrieved per question in score order,
                  the question (serve_retrieval.py): ret_vllm, ret_kvplug_cpu (offload alone),
                  ret_kvplug_blend (offload + blend, default settings), ret_kvplug_blend_oracle
                  (every document stored beforehand as a chunk); opt-in: ret_kvplug_blend_content
                  (chunking: content on the same prompts joined by blank lines, no separators) and
                  ret_vllm_newlines (vLLM alone on those prompts: the content row's reference for
                  agreement; issue 21's content_vs_separator_*); then a fresh pass (new documents)
                  on the first three and, on ret_vllm, the row reproduced with `vllm bench serve`
                  (serve_vllm_bench.py). Each row's greedy outputs are compared with ret_vllm's.
  neighbours      the case in ``serve_neighbours.py``: TTFT of pure CPU-tier hits alone and among
                  slow neighbours (disk/Redis loads, first-seen documents, blended requests), on
                  kvplug before issue 10's restructure (nb_before: git revision 2370964 run side by
                  side; nb_sync: ``async_loads: false``) and after it (nb_after). Its own trace.
--traces defaults to both traces; a command line that selects --configs, --policies or
--neighbours without --ret-configs runs the rag_sessions trace alone, as it did before.

Modes. Each configuration is a fresh server (~40 s to start on 2 quiet cores, 2-3 min when the
machine is busy or the page cache cold), so the number of servers dominates a quick run:
  --quick  rag_sessions: 16 requests over 8 contexts; main group vllm, kvplug_cpu,
           kvplug_cpu_disk, kvplug_blend_default, kvplug_oracle; eviction policies lru, s3fifo,
           cost_aware on the same 16 requests with a CPU tier of 0.5x their working set;
           retrieval: 8 requests, its four configurations, a fresh pass of 2 requests, no
           vllm bench serve; neighbours nb_before, nb_after at the quick sizes (14 servers).
  full     rag_sessions: 64 requests; the main group with kvplug_cpu_remote, the forced-policy
           blend rows and kvplug_blend_oracle; all six eviction policies on the whole trace with a
           CPU tier of 0.35x its working set; retrieval: 48 requests (72% of document occurrences
           repeats), fresh pass of 6, vllm bench serve on the first 8 requests (2 rounds);
           neighbours nb_before, nb_sync, nb_after (23 servers).
``--configs``, ``--policies``, ``--ret-configs``, ``--neighbours`` (``''`` skips a group), ``--requests``,
``--evict-requests``, ``--evict-cpu-frac``, the ``--ret-*``, ``--fresh-*``, ``--bench-serve-*`` and
``--nb-*`` sizes override either mode. ``--dtype`` (default bfloat16) is the servers' model and KV
dtype: on CPUs without AMX (or AVX-512 bf16) float32 prefills ~4x faster than bf16.

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
working set. The retrieval trace's prompts differ past the system prompt (and a repeated first
document), so its reuse is blending's: documents in new combinations and orders.

Recorded per configuration: TTFT p50/p90/p99, inter-token latency (per request: mean gap
between streamed chunks after the first), requests/s, output and prompt tokens/s, kvplug's
counters and hit rates per tier, vLLM's prefix-cache hit rate, ratios vs vLLM alone and the
share of the oracle's requests/s; for blend configurations blended requests, chunk hit rate
(chunk hits / (hits + misses)), recomputed fraction (recomputed tokens / blended tokens) and
blend seconds per blended request; each request's output text. Writes
``benchmarks/results/serve.json`` (the ``quick`` field says which mode; sections "configs",
"policies", "neighbours", "retrieval", "previous", and the top-level "headline" of issue 17's
figures with "headline_notes" for those whose inputs are missing: serve_headline.py, definitions
under definitions.headline) and PNG plots ``serve_ttft.png``, ``serve_throughput.png``,
``serve_policies.png``, ``serve_blend.png`` through ``plots.py`` (when the main group ran).
Clients and statistics: ``serve_clients.py``; report and tables: ``serve_report.py``; traces:
``serve_traces.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_neighbours  # noqa: E402
import serve_report  # noqa: E402
import serve_configs  # noqa: E402
import serve_headline  # noqa: E402
import serve_retrieval  # noqa: E402
import serve_traces  # noqa: E402
import serving  # noqa: E402
# Re-exported: the clients and statistics lived here before serve_clients.py.
from serve_clients import (LoadSampler, Timed, aggregate, blend_summary, hit_rates,  # noqa: E402,F401
                           itl_from_chunks, kvplug_origin, run_trace, scrape, warm_pass, with_ratios)
# Re-exported: the registry lived here before serve_configs.py.
from serve_configs import CONFIGS, GROUPS, POLICIES, Plan, ServeConfig, register  # noqa: E402,F401
from serve_report import print_report  # noqa: E402,F401
# Re-exported: the rag_sessions trace lived here before serve_traces.py.
from serve_traces import (WORKLOAD, build_trace, document_warm_prompts, export_custom,  # noqa: E402,F401
                          rag_session_trace, unique_context_tokens, warm_up_prompts)
from workloads import Request  # noqa: E402
from workloads.retrieval import SYSTEM_PROMPT  # noqa: E402

BLOCK = 128  # vLLM's CPU block size (tokens)
MAIN_FULL = ("vllm", "kvplug_cpu", "kvplug_cpu_disk", "kvplug_cpu_remote", "kvplug_blend", "kvplug_blend_adaptive",
             "kvplug_blend_query", "kvplug_blend_default", "kvplug_oracle", "kvplug_blend_oracle")
# Without the remote tier (a Redis server and one more start) and the blend rows that force a
# policy (the default's row stays): quick stays at 5 servers for this trace.
MAIN_QUICK = ("vllm", "kvplug_cpu", "kvplug_cpu_disk", "kvplug_blend_default", "kvplug_oracle")
POLICIES_QUICK = ("lru", "s3fifo", "cost_aware")  # the best, the baseline and the worst of the long run
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# ---------------------------------------------------------------- one configuration
def prewarm(url: str, args, trace: list[Request], prompts: list[str] | None = None) -> dict:
    """An oracle's warm-up pass (untimed; default prompts: every context of the trace), then
    settled counters so its saves are not charged to the trace."""
    t0 = time.monotonic()
    results = warm_pass(url, args.model, warm_up_prompts(trace) if prompts is None else prompts, args.concurrency,
                        "warm-up")
    serving.scrape_settled(url, quiet_s=3.0, max_wait_s=20.0)
    return {"requests": len(results), "errors": sum(1 for r in results if r.error), "wall_s": time.monotonic() - t0}


def warm_prompts(cfg: ServeConfig, args, trace: list[Request]) -> list[str]:
    """The prompts of cfg's warm-up pass (see ServeConfig.prewarm)."""
    if cfg.prewarm == "contexts":
        return warm_up_prompts(trace)
    if cfg.group == "retrieval":  # its documents always follow the system prompt
        return document_warm_prompts(trace, args.ret_join, SYSTEM_PROMPT)
    return document_warm_prompts(trace, "separator", None)


def run_config(cfg: ServeConfig, extra: dict | None, args, trace, env, serve_args, work: Path,
               after: Callable[[str, ServeConfig], dict] | None = None) -> dict:
    """One fresh server: (warm-up), the timed trace, its counters; `after(url, cfg)` adds sections
    measured on the same server once the trace is done (the fresh pass, vllm bench serve)."""
    log = work / f"{cfg.name}.log"
    print(f"== {cfg.name}: {cfg.description}; extra_config={extra} (log {log})", flush=True)
    t0 = time.monotonic()
    with serving.start_server(args.model, extra, env, None, log, serve_args, cwd=work,
                              pin_cpus=args.reserved_cpus >= 0) as url:
        start_s = time.monotonic() - t0
        # A short untimed request first: one-time lazy set-up is not charged to the trace.
        serving.stream_request(url, args.model, "Hello, my name is", 2)
        warm_up = prewarm(url, args, trace, warm_prompts(cfg, args, trace)) if cfg.prewarm else None
        before = scrape(url)
        results, wall = run_trace(url, args.model, trace, args.concurrency, cfg.name)
        serving.scrape_settled(url, quiet_s=3.0, max_wait_s=20.0)
        after_trace = scrape(url)
        sections = after(url, cfg) if after is not None else {}
    counters = {k: serving.counter_delta(after_trace[k], before[k]) for k in after_trace}
    log_text = log.read_text(errors="replace")
    stats = {"config": cfg.name, "group": cfg.group, "policy": cfg.policy, **aggregate(results, wall),
             **hit_rates(counters["kvplug"], counters["prefix_cache"]), **blend_summary(counters["kvplug"])}
    for r in results:
        if r.error:
            print(f"  [{cfg.name}] request {r.index} failed: {r.error}", flush=True)
    return {"stats": stats, "extra_config": extra, "description": cfg.description,
            "server_start_s": start_s, "counters": counters, "warm_up": warm_up,
            "omp_core_ids": serving.omp_binding(log_text), "vllm_kv_cache_tokens": serving.kv_cache_tokens(log_text),
            "requests": [{"i": r.index, "start_s": r.start_s, "ttft_s": r.ttft_s, "total_s": r.total_s,
                          "itl_s": itl_from_chunks(r.chunk_times), "n_tokens": r.n_tokens,
                          "prompt_tokens": r.prompt_tokens, "error": r.error, "text": r.text} for r in results],
            **sections}


def after_trace_hook(args, fresh: list[Request], ret_trace: list[Request], work: Path, env: dict):
    """What the retrieval servers measure after their trace: the fresh pass (configurations with
    fresh_pass) and the `vllm bench serve` reproduction (on --bench-serve-config)."""
    def after(url: str, cfg: ServeConfig) -> dict:
        out = {}
        if cfg.fresh_pass and fresh:
            out["fresh_pass"] = serve_retrieval.fresh_pass(url, args.model, fresh, args.fresh_concurrency,
                                                           f"{cfg.name} fresh")
        if cfg.name == args.bench_serve_config and args.bench_serve_requests:
            import serve_vllm_bench
            out["vllm_bench"] = serve_vllm_bench.check(url, args.model, ret_trace[:args.bench_serve_requests],
                                                       args.concurrency, work, env, config=cfg.name)
        return out
    return after


# ---------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer requests, contexts and servers: main group without kvplug_cpu_remote, "
                        f"eviction policies {','.join(POLICIES_QUICK)} only, neighbours "
                        f"{','.join(serve_neighbours.NB_QUICK)} at small sizes (11 servers)")
    p.add_argument("--json", type=Path, default=None, help="output JSON (default results/serve.json)")
    p.add_argument("--previous", type=Path, default=None,
                   help="earlier report to compare requests/s with (default: --json if it exists, else "
                        "results/serve_full.json, or results/serve.json with --quick); '' = none")
    p.add_argument("--plots-prefix", default=None, help="PNG path prefix (default: <JSON folder>/serve_)")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2)")
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--concurrency", type=int, default=None, help="client threads (default 4)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPE_BYTES),
                   help="the servers' model and KV dtype (default bfloat16; float32 is ~4x faster on CPUs "
                        "without AMX/AVX-512 bf16)")
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
    p.add_argument("--max-model-len", type=int, default=5120,
                   help="raised for the retrieval trace's servers to fit its longest prompt")
    p.add_argument("--evict-cpu-frac", type=float, default=None,
                   help="eviction runs: CPU tier bytes / the eviction trace's working set (quick 0.5: "
                        "a small trace needs a larger share for the policies to differ; else 0.35)")
    p.add_argument("--evict-disk", action="store_true", help="eviction runs: add a disk tier of 2x the CPU tier")
    p.add_argument("--configs", default=None,
                   help=f"main-group configurations (quick {','.join(MAIN_QUICK)}; else {','.join(MAIN_FULL)})")
    p.add_argument("--policies", default=None,
                   help=f"eviction policies, '' = skip (quick {','.join(POLICIES_QUICK)}; else all six)")
    serve_neighbours.add_args(p)
    serve_retrieval.add_args(p)
    p.add_argument("--reserved-cpus", type=int, default=1,
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU of every server (same cores with and without a connector); "
                        "-1 leaves vLLM's own choice, which on 2 cores gives a server with a KV connector 2 OpenMP "
                        "threads and one without 1 (the retrieval and rag_sessions traces; the neighbours case "
                        "always pins)")
    p.add_argument("--kvplug-rev", default=None,
                   help="run the servers on kvplug as committed at this git revision (default: working tree)")
    return _defaults(p.parse_args(argv), argv)


def _defaults(a, argv):
    """Mode defaults for what the command line left out."""
    a.argv = list(sys.argv[1:] if argv is None else argv)  # in the report: how to run it again
    serve_retrieval.finish_args(a, RESULTS)  # --demo's presets first
    a.json = a.json or RESULTS / "serve.json"
    a.dtype = a.dtype or "bfloat16"
    a.concurrency = a.concurrency or 4
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
    """The main and eviction configurations asked for (when --traces has rag_sessions), then the
    retrieval group's (when it has retrieval); each trace's vLLM alone must be among them when it
    has any (their ratios are to it). A run of the neighbours case alone needs none."""
    names = []
    if serve_retrieval.runs_trace(args, WORKLOAD):
        names = [n for n in args.configs.split(",") if n]
        names += [f"evict_{p}" for p in args.policies.split(",") if p]
        if names and "vllm" not in names:
            raise SystemExit("the 'vllm' configuration is the reference and must run")
    ret = serve_retrieval.selected_names(args)
    configs = serve_configs.CONFIGS
    unknown = [n for n in names + ret if n not in configs]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; registered: {', '.join(configs)}")
    wrong = [n for n in names if configs[n].group == "retrieval"] + [n for n in ret if configs[n].group != "retrieval"]
    if wrong:
        raise SystemExit(f"configurations {wrong} belong to the other trace: --configs takes the rag_sessions "
                         "trace's, --ret-configs the retrieval trace's")
    if not names + ret and not serve_neighbours.selected(args):
        raise SystemExit("nothing to run: --configs, --policies, --ret-configs and --neighbours are all empty")
    return [configs[n] for n in names + ret]


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all = time.monotonic()
    from models import resolve_model

    args.model = resolve_model(args.model, args.data_dir)
    from transformers import AutoTokenizer

    cfgs, nb_cfgs = selected(args), serve_neighbours.selected(args)
    tok = AutoTokenizer.from_pretrained(args.model)
    traces = build_traces(args, tok, cfgs)
    if args.export_custom is not None:
        for name, path in export_custom(args.export_custom, {n: t for n, (t, _) in traces.items()}).items():
            print(f"wrote {path} ({len(traces[name][0])} requests of the {name} trace)")
        return 0
    # One folder per run: two runs at once must not wipe each other's disk tiers and logs.
    work = Path(args.data_dir).resolve() / "bench" / f"serve-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan, per_tok = make_plan(args, traces, work)
    env = server_env(args, work)
    serve_args = {g: server_args(args, per_tok, traces, g) for g in GROUPS}
    previous = serve_report.load_previous(args.previous)  # before --json (maybe the same file) is rewritten
    ret = traces.get(serve_traces.RETRIEVAL)
    after = after_trace_hook(args, ret[1]["fresh"], ret[0], work, env) if ret else None
    with contextlib.ExitStack() as stack:
        if nb_cfgs or any("remote_url" in (c.extra(plan) or {}) for c in cfgs):
            plan = dataclasses.replace(plan, remote_url=stack.enter_context(serving.redis_server(work / "redis")))
        runs, load = run_all(cfgs, args, traces, plan, env, serve_args, work, after)
        extra = {"neighbours": run_neighbours(nb_cfgs, args, tok, plan, env, serve_args["main"], work, per_tok)} \
            if nb_cfgs else {}
    chunk_time = chunking_time(tok) if serve_headline.CONTENT in {c.name for c in cfgs} else None
    report = build_report(args, runs, traces, plan, per_tok, serve_args, time.monotonic() - t_all, load, extra,
                          chunk_time)
    if previous is not None and report["configs"]:
        report["previous"] = serve_report.vs_previous(report["configs"], report["workload"], previous, args.previous)
    return write_and_print(report, args)


def build_traces(args, tok, cfgs) -> dict[str, tuple[list[Request], dict]]:
    """{trace name: (requests, workload info)} for the traces the selected configurations run
    (both for --export-custom); the retrieval info carries its fresh pass under "fresh"."""
    groups = {c.group for c in cfgs}
    out = {}
    if groups & {"main", "eviction"} or (args.export_custom and serve_retrieval.runs_trace(args, WORKLOAD)):
        out[WORKLOAD] = build_trace(args, tok)
    if "retrieval" in groups or (args.export_custom and serve_retrieval.runs_trace(args, serve_traces.RETRIEVAL)):
        trace, fresh, info = serve_traces.build_retrieval(args, tok)
        out[serve_traces.RETRIEVAL] = (trace, {**info, "fresh": fresh})
    for name, (trace, info) in out.items():
        print(f"workload {name}: {len(trace)} requests, prompt ~{info['prompt_tokens_mean']:.0f} tokens "
              f"(max {info['prompt_tokens_max']}), repeat share of document occurrences {info['repeat_share']:.3f}",
              flush=True)
    return out


def make_plan(args, traces: dict, work: Path) -> tuple[Plan, int]:
    from offload import kv_bytes_per_token

    per_tok = kv_bytes_per_token(Path(args.model), DTYPE_BYTES[args.dtype])
    rag_info = traces.get(WORKLOAD, (None, {}))[1]
    ret_info = traces.get(serve_traces.RETRIEVAL, (None, {}))[1]
    plan = Plan(rag_info.get("working_set_tokens", 0) * per_tok, rag_info.get("eviction_working_set_tokens", 0) * per_tok,
                str(work), args.evict_cpu_frac, args.evict_disk,
                ret_prefix_bytes=ret_info.get("prefix_working_set_tokens", 0) * per_tok,
                ret_chunk_bytes=ret_info.get("chunk_working_set_tokens", 0) * per_tok)
    print(f"KV {per_tok} bytes/token ({args.dtype}); vLLM cache {args.vllm_kv_blocks * BLOCK} tokens; rag_sessions "
          f"working set {plan.working_set_bytes / 2**20:.0f} MiB (eviction {plan.evict_working_set_bytes / 2**20:.0f} "
          f"MiB); retrieval prefixes {plan.ret_prefix_bytes / 2**20:.0f} MiB, chunks "
          f"{plan.ret_chunk_bytes / 2**20:.0f} MiB", flush=True)
    return plan, per_tok


def server_args(args, per_tok: int, traces: dict, group: str) -> list[str]:
    """vllm serve's arguments; the retrieval trace's servers get a max-model-len that fits its
    longest prompt and output (vLLM's own cache must hold one such request)."""
    max_len = args.max_model_len
    if group == "retrieval" and serve_traces.RETRIEVAL in traces:
        need = traces[serve_traces.RETRIEVAL][1]["prompt_tokens_max"] + args.max_tokens
        max_len = max(max_len, -(-need // BLOCK) * BLOCK)
    if max_len > (args.vllm_kv_blocks - 1) * BLOCK:  # vLLM keeps a block's worth of its budget back
        raise SystemExit(f"--vllm-kv-blocks {args.vllm_kv_blocks} holds {(args.vllm_kv_blocks - 1) * BLOCK} tokens "
                         f"of a request: below the {max_len} a request of the {group} group may need")
    return ["--enforce-eager", "--dtype", args.dtype, "--max-model-len", str(max_len),
            "--enable-prefix-caching", "--seed", "0",
            "--kv-cache-memory-bytes", str(args.vllm_kv_blocks * BLOCK * per_tok)]


def server_env(args, work: Path) -> dict:
    """The servers' environment; sets args.kvplug_source. The working tree goes first on PYTHONPATH:
    the editable install may point at another checkout, whose kvplug the servers would import."""
    from offload import kvplug_source

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE")}
    if args.reserved_cpus >= 0:
        env = serving.same_cpu_threads_env(env, args.reserved_cpus)
    else:
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
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


def run_all(cfgs, args, traces, plan, env, serve_args, work, after=None) -> tuple[dict, dict]:
    """Every configuration in turn (main group on the whole rag_sessions trace, eviction group on
    its prefix, retrieval group on the retrieval trace, then `after`); returns the runs and the
    load average seen before and during them."""
    runs, before = {}, os.getloadavg()
    with LoadSampler() as load:
        for cfg in cfgs:
            t_cfg = time.monotonic() - load._t0
            if cfg.group == "retrieval":
                sub, hook = rejoined(traces[serve_traces.RETRIEVAL][0], args.ret_join, cfg.join), after
            else:
                trace = traces[WORKLOAD][0]
                sub, hook = (trace if cfg.group == "main" else trace[:args.evict_requests]), None
            run = run_with_retry(cfg, plan, args, sub, env, serve_args[cfg.group], work, hook)
            if run is not None:
                runs[cfg.name] = {**run, "load": load.summary(since_s=t_cfg), "join": cfg.join}
    return runs, {"before": before, "during": load.summary()}


def rejoined(trace: list[Request], join: str, to: str | None) -> list[Request]:
    """The trace with its parts joined by JOINS[to] instead of JOINS[join] (None: unchanged)."""
    from workloads.retrieval import JOINS

    if to is None or to == join:
        return trace
    return [dataclasses.replace(r, prompt=r.prompt.replace(JOINS[join], JOINS[to])) for r in trace]


def run_with_retry(cfg, plan, args, trace, env, serve_args, work, after=None) -> dict | None:
    """A server that fails to start (e.g. the shared venv being reinstalled under it) is tried
    once more; a second failure skips the configuration (listed in the report), never the run."""
    for attempt in (1, 2):
        shutil.rmtree(work / "disk", ignore_errors=True)
        try:
            return run_config(cfg, cfg.extra(plan), args, trace, env, serve_args, work, after)
        except serving.ServerError as e:
            print(f"  [{cfg.name}] server failed (attempt {attempt}): {str(e)[-600:]}", flush=True)
            time.sleep(10)
    return None


def chunking_time(tok) -> list[dict]:
    """The scheduler's chunking time per request at 32K tokens, both chunkings (benchmarks/chunking.py's
    timing, this run's tokenizer, 10 repeats): issue 21's third figure, measured in the same run."""
    import chunking

    return chunking.timing(tok, chunking.make_passages(tok, 48, seed=0), chunking.bench_namespace(),
                           chunking.default_params(), [32768], 10)


def build_report(args, runs, traces, plan, per_tok, serve_args, wall_s, load, extra=None, chunk_time=None) -> dict:
    """The report (serve_report.build) with the retrieval section and the headline. `traces`:
    build_traces' dict, or (older callers) the rag_sessions workload info alone. `chunk_time`:
    chunking_time's rows, kept in the retrieval section."""
    if not isinstance(traces, dict) or WORKLOAD not in traces and serve_traces.RETRIEVAL not in traces:
        traces = {WORKLOAD: (None, traces)}
    expected = {c.name: c.group for c in selected(args)}
    rag = {n: r for n, r in runs.items() if r["stats"]["group"] != "retrieval"}
    workload = traces.get(WORKLOAD, (None, {"name": WORKLOAD, "requests": 0, "concurrency": args.concurrency}))[1]
    sa = serve_args["main"] if isinstance(serve_args, dict) else serve_args
    report = serve_report.build(args, rag, workload, plan, per_tok, sa, wall_s, load,
                                [n for n, g in expected.items() if g != "retrieval"], extra)
    report["dtype"], report["demo"] = args.dtype, bool(getattr(args, "demo", False))
    if serve_traces.RETRIEVAL in traces:
        info = {k: v for k, v in traces[serve_traces.RETRIEVAL][1].items() if k != "fresh"}
        ret = {n: r for n, r in runs.items() if r["stats"]["group"] == "retrieval"}
        report["retrieval"] = serve_retrieval.section(ret, info, [n for n, g in expected.items() if g == "retrieval"])
        report["retrieval"]["serve_args"] = serve_args.get("retrieval") if isinstance(serve_args, dict) else sa
        if chunk_time is not None:
            report["retrieval"]["chunking_time"] = chunk_time
    report["headline"], report["headline_notes"], report["headline_details"] = serve_headline.headline(report)
    report["definitions"] = {**report["definitions"], "headline": serve_headline.DEFINITIONS}
    return report


if __name__ == "__main__":
    sys.exit(main())
