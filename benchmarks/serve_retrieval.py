"""The retrieval trace's side of benchmarks/serve.py: its options, its fresh pass, the answers'
agreement with vLLM alone, its report section and table.

    TRACES, RET_FULL, RET_QUICK, DEMO        trace names; the retrieval group's configurations
    add_args(parser) / finish_args(args)     --traces, --ret-*, --fresh-*, --bench-serve-*, --demo, --export-custom
    selected_names(args) -> list[str]        the retrieval configurations a run asks for
    fresh_pass(url, model, fresh, concurrency, desc) -> dict   the pass of new documents (TTFT, counters)
    agreement(texts, reference) -> dict      share of requests whose greedy output equals vLLM alone's (95% CI)
    section(runs, info, expected) -> dict    the report's "retrieval" section
    print_section(sec) / print_demo(sec)     its tables; make demo's side-by-side summary

The retrieval trace (benchmarks/workloads/retrieval.py): a fixed system prompt, the top-k (4-8) of
200 documents of 256-768 tokens retrieved per question in score order (Zipf popularity + per-question
noise), the question. Its configurations (group "retrieval", one fresh server each):
  ret_vllm                  vLLM alone (the reference of its ratios)
  ret_kvplug_cpu            offload alone: kvplug's CPU tier (holds every prefix of the trace)
  ret_kvplug_blend          offload + blend, kvplug's default blend settings
  ret_kvplug_blend_oracle   ret_kvplug_blend with every document stored beforehand as a chunk (an
                            untimed warm-up pass sends "system prompt SEP document SEP question" once per
                            document of the trace): share_of_oracle = requests/s / its requests/s
After the timed trace, ret_vllm, ret_kvplug_cpu and ret_kvplug_blend run a fresh pass: --fresh-requests
requests of documents the trace never holds (nothing to blend, every chunk to save), at
--fresh-concurrency (1: each TTFT is the request's own), with counters over the pass. Its mean TTFT
with blend on / offload alone is cold_pass_ttft_vs_offload; vLLM alone's gives the prefill seconds
per token (serve_headline.py).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402
from serve_clients import aggregate, run_trace, scrape, scrape_delta, with_ratios  # noqa: E402
from serve_report import with_oracle_share  # noqa: E402

TRACES = ("rag_sessions", "retrieval")
REFERENCE, ORACLE = "ret_vllm", "ret_kvplug_blend_oracle"
RET_FULL = ("ret_vllm", "ret_kvplug_cpu", "ret_kvplug_blend", "ret_kvplug_blend_oracle")
RET_QUICK = RET_FULL
DEMO = ("ret_vllm", "ret_kvplug_cpu", "ret_kvplug_blend")
# --demo (make demo): the retrieval trace alone, three servers, float32 (bf16 GEMMs are ~4x slower
# on CPUs without AMX), small documents and few requests: a few minutes on 2 cores.
DEMO_SIZES = {"ret_requests": 10, "ret_docs": 20, "ret_doc_min_tokens": 64, "ret_doc_max_tokens": 160,
              "ret_k_min": 3, "ret_k_max": 5, "max_tokens": 8, "concurrency": 2}
# The workload's defaults (the 48-request trace repeats 72% of its document occurrences).
SIZES = {"ret_docs": 200, "ret_doc_min_tokens": 256, "ret_doc_max_tokens": 768, "ret_k_min": 4, "ret_k_max": 8}


def add_args(p) -> None:
    p.add_argument("--traces", default=None,
                   help="traces to run: rag_sessions (--configs, --policies) and/or retrieval (--ret-configs); "
                        "default both, but rag_sessions alone when --configs, --policies or --neighbours is "
                        "given and --ret-configs is not (what such a command line ran before the retrieval trace)")
    p.add_argument("--ret-configs", default=None,
                   help=f"retrieval-trace configurations, '' = skip (default {','.join(RET_FULL)})")
    p.add_argument("--ret-requests", type=int, default=None, help="retrieval trace length (quick 8, else 48)")
    for name, v in SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"retrieval trace (default {v})")
    p.add_argument("--ret-zipf", type=float, default=1.2, help="Zipf exponent of document popularity")
    p.add_argument("--ret-noise", type=float, default=1.0, help="scale of the per-question score noise")
    p.add_argument("--ret-join", default="separator", choices=("separator", "newlines"),
                   help="how prompt parts are joined (newlines: no blend chunks with the default separator)")
    p.add_argument("--ret-order", default="score", choices=("score", "shuffled"))
    p.add_argument("--fresh-requests", type=int, default=None,
                   help="fresh pass after the retrieval trace, requests of new documents (quick 2, else 6; 0 = none)")
    p.add_argument("--fresh-concurrency", type=int, default=1)
    p.add_argument("--bench-serve-requests", type=int, default=None,
                   help="reproduce a row with `vllm bench serve` on the first N retrieval requests, "
                        "alternating with this script's clients twice (quick 0 = off, else 8)")
    p.add_argument("--bench-serve-config", default=REFERENCE, help="the row the reproduction runs on")
    p.add_argument("--demo", action="store_true",
                   help=f"make demo: the retrieval trace only, {','.join(DEMO)}, float32, small sizes "
                        "(results/serve_demo.json)")
    p.add_argument("--export-custom", type=Path, default=None,
                   help="write the traces as vllm bench serve custom datasets (<dir>/<trace>.jsonl) and exit")


def finish_args(a, results: Path) -> None:
    """Demo presets first (what the command line left unset), then the mode defaults."""
    if a.demo:
        a.traces = "retrieval"
        a.configs, a.policies, a.neighbours = "", "", ""
        a.ret_configs = a.ret_configs if a.ret_configs is not None else ",".join(DEMO)
        a.dtype = a.dtype or "float32"
        a.json = a.json or results / "serve_demo.json"
        a.fresh_requests = a.fresh_requests or 0
        a.bench_serve_requests = a.bench_serve_requests or 0
        a.previous = a.previous or Path("")
        for k, v in DEMO_SIZES.items():
            if getattr(a, k) is None:
                setattr(a, k, v)
    for k, v in SIZES.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.traces is None:
        older = a.ret_configs is None and any(x is not None for x in (a.configs, a.policies, a.neighbours))
        a.traces = TRACES[0] if older else ",".join(TRACES)
    unknown = [t for t in a.traces.split(",") if t and t not in TRACES]
    if unknown:
        raise SystemExit(f"unknown traces {unknown}; allowed: {', '.join(TRACES)}")
    a.ret_requests = a.ret_requests or (8 if a.quick else 48)
    a.fresh_requests = a.fresh_requests if a.fresh_requests is not None else (2 if a.quick else 6)
    a.bench_serve_requests = a.bench_serve_requests if a.bench_serve_requests is not None else (0 if a.quick else 8)
    if a.ret_configs is None:
        a.ret_configs = ",".join(RET_QUICK if a.quick else RET_FULL)


def runs_trace(args, name: str) -> bool:
    return name in args.traces.split(",")


def selected_names(args) -> list[str]:
    if not runs_trace(args, "retrieval"):
        return []
    names = [n for n in args.ret_configs.split(",") if n]
    if names and REFERENCE not in names:
        raise SystemExit(f"the '{REFERENCE}' configuration is the retrieval trace's reference and must run")
    return names


# ---------------------------------------------------------------- fresh pass
def fresh_pass(url: str, model: str, fresh: list, concurrency: int, desc: str) -> dict:
    """The requests of new documents after the trace, with kvplug's and vLLM's counters over them."""
    before = scrape(url)
    results, wall = run_trace(url, model, fresh, concurrency, desc)
    _, delta = scrape_delta(url, before)
    stats = aggregate(results, wall)
    return {"requests": len(fresh), "concurrency": concurrency, "wall_s": wall,
            "ttft_mean_s": stats["ttft_mean_s"], "ttft_p50_s": stats["ttft_p50_s"], "errors": stats["errors"],
            "prompt_tokens": stats["prompt_tokens"],
            "ttft_s": [r.ttft_s for r in results], "prompt_tokens_of_request": [r.prompt_tokens for r in results],
            "counters": delta}


# ---------------------------------------------------------------- agreement
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of the proportion k / n (NaN, NaN when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def agreement(texts: list[str | None], reference: list[str | None]) -> dict:
    """Requests whose output equals the reference's for the same prompt (both greedy, same max
    tokens) / requests both answered, with its 95% Wilson interval; and the mean share of the
    reference's characters before the first difference."""
    pairs = [(t, r) for t, r in zip(texts, reference, strict=True) if t is not None and r is not None]
    same = sum(1 for t, r in pairs if t == r)
    prefix = []
    for t, r in pairs:
        n = next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), min(len(t), len(r)))
        prefix.append(n / len(r) if r else 1.0)
    lo, hi = wilson(same, len(pairs))
    return {"agreement_vs_vllm": serving.ratio(same, len(pairs)), "agreement_ci95": [lo, hi],
            "agreement_n": len(pairs), "agreement_prefix_share": sum(prefix) / len(prefix) if prefix else math.nan}


# ---------------------------------------------------------------- report
SECTION_DEFINITIONS = {
    "ratios": f"configuration / {REFERENCE} (vLLM alone) on the retrieval trace (throughput: requests/s)",
    "share_of_oracle": f"requests/s / the requests/s of {ORACLE} (every document of the trace stored as a chunk "
                       "beforehand by an untimed warm-up pass)",
    "agreement_vs_vllm": f"requests whose greedy output text equals {REFERENCE}'s for the same prompt / requests "
                         "both answered; agreement_ci95 its 95% Wilson interval; agreement_prefix_share the mean "
                         "share of vLLM alone's characters before the first difference",
    "fresh_pass": "after the timed trace, --fresh-requests requests of documents the trace never holds, at "
                  "--fresh-concurrency; ttft_mean_s their mean TTFT; counters: deltas over the pass",
    "repeat_share": "document occurrences whose document appeared earlier in the trace / all occurrences",
    "first_document_repeat_share": "requests whose first document was an earlier request's first document / "
                                   "requests: the prefix they repeat beyond the system prompt"}


def section(runs: dict[str, dict], info: dict, expected: list[str]) -> dict:
    """Ratios vs ret_vllm, share of the oracle, agreement with ret_vllm's outputs per configuration."""
    if runs and REFERENCE not in runs:
        raise SystemExit(f"{REFERENCE} (the retrieval trace's reference) did not run")
    base = runs[REFERENCE]["stats"] if runs else None
    configs = {}
    for n, r in runs.items():
        # a row on re-joined prompts is compared with vLLM alone on the same prompts when it ran
        ref = f"{REFERENCE}_{r['join']}" if r.get("join") and f"{REFERENCE}_{r['join']}" in runs else REFERENCE
        texts, ref_texts = [q.get("text") for q in r["requests"]], [q.get("text") for q in runs[ref]["requests"]]
        configs[n] = {**with_ratios(r["stats"], base), **agreement(texts, ref_texts), "agreement_reference": ref,
                      "join": r.get("join") or info.get("join")}
    configs = with_oracle_share(configs, ORACLE)
    details = {n: {k: r.get(k) for k in ("description", "extra_config", "server_start_s", "warm_up",
                                         "omp_core_ids", "vllm_kv_cache_tokens", "load", "counters")}
               for n, r in runs.items()}
    return {"workload": info, "failed_configs": [n for n in expected if n not in runs], "configs": configs,
            "fresh_pass": {n: r["fresh_pass"] for n, r in runs.items() if r.get("fresh_pass")},
            "vllm_bench": next((r["vllm_bench"] for r in runs.values() if r.get("vllm_bench")), None),
            "config_details": details, "requests": {n: r["requests"] for n, r in runs.items()},
            "definitions": SECTION_DEFINITIONS}


COLUMNS = ["config", "requests", "errors", "ttft_p50_s", "ttft_p90_s", "requests_per_s", "throughput_ratio_vs_vllm",
           "share_of_oracle", "agreement_vs_vllm", "kvplug_hit_rate", "vllm_prefix_hit_rate", "blend_chunk_hit_rate",
           "blend_s_per_request"]


def print_section(sec: dict) -> None:
    w = sec["workload"]
    print(f"\nretrieval trace: {w['requests']} requests, concurrency {w['concurrency']}, prompt "
          f"~{w['prompt_tokens_mean']:.0f} tokens, {w['distinct_documents']} distinct documents; repeat share "
          f"{w['repeat_share']:.3f} (first document repeated {w['first_document_repeat_share']:.3f}); "
          f"ratios vs {REFERENCE}, share of {ORACLE}")
    serving.print_table(list(sec["configs"].values()), COLUMNS)
    if sec["fresh_pass"]:
        print("\nfresh pass (documents never seen: nothing to blend, every chunk saved)")
        serving.print_table([{"config": n, **{k: f[k] for k in ("requests", "concurrency", "ttft_mean_s",
                                                                 "ttft_p50_s", "prompt_tokens", "errors")}}
                             for n, f in sec["fresh_pass"].items()],
                            ["config", "requests", "concurrency", "ttft_mean_s", "ttft_p50_s", "prompt_tokens",
                             "errors"])
    if sec.get("vllm_bench"):
        import serve_vllm_bench
        serve_vllm_bench.print_result(sec["vllm_bench"])
    if sec["failed_configs"]:
        print(f"WARNING: retrieval servers that did not start: {sec['failed_configs']}")


DEMO_NAMES = {"ret_vllm": "vLLM alone", "ret_kvplug_cpu": "offload alone (kvplug CPU tier)",
              "ret_kvplug_blend": "offload + blend (kvplug defaults)", ORACLE: "oracle (documents stored first)"}


def print_demo(sec: dict) -> None:
    """vLLM alone, offload alone and offload + blend side by side, then what blending did."""
    w, rows = sec["workload"], sec["configs"]
    print(f"\nretrieval demo: {w['requests']} requests of ~{w['prompt_tokens_mean']:.0f} tokens, a system prompt and "
          f"{w['k_min']}-{w['k_max']} retrieved documents each; {w['repeat_share']:.0%} of document occurrences "
          f"repeat an earlier one, in other combinations and orders")
    serving.print_table([{"configuration": DEMO_NAMES.get(n, n), **r} for n, r in rows.items()],
                        ["configuration", "requests_per_s", "throughput_ratio_vs_vllm", "ttft_p50_s", "ttft_p90_s",
                         "agreement_vs_vllm", "blend_requests", "blend_chunk_hit_rate"])
    blend, cpu = rows.get("ret_kvplug_blend"), rows.get("ret_kvplug_cpu")
    if blend and cpu and cpu["requests_per_s"]:
        print(f"offload + blend: {blend['requests_per_s'] / cpu['requests_per_s']:.2f}x offload alone's requests/s, "
              f"{blend['throughput_ratio_vs_vllm']:.2f}x vLLM alone's; {blend['blend_requests']:.0f} requests blended "
              f"{blend['blend_chunk_hits']:.0f} cached chunks (numbers from a shared 2-core CPU are noisy)")
    if sec["failed_configs"]:
        print(f"WARNING: servers that did not start: {sec['failed_configs']}")
