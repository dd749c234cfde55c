"""serve.json's top-level `headline`: issue 17's figures (and issue 18's guard_rps_ratio), each
computed from the report's sections, or null with a note saying which input is missing.

    KEYS                          the headline's names, in order (issue 17)
    DEFINITIONS                   what each one is, precisely (written to the report)
    headline(report) -> (values, notes, details)

Nothing here is measured: a figure whose inputs did not run (a configuration that failed or was
not selected, a counter the kvplug under test does not have) is None, and notes[name] says why.
"""
from __future__ import annotations

import math

KEYS = ("blend_vs_offload_rps", "retrieval_blend_vs_offload_rps", "retrieval_blend_share_of_oracle",
        "retrieval_blend_vs_vllm_rps", "retrieval_repeat_share", "neighbours_hit_p50_ratio",
        "chunk_save_s_per_chunk", "cold_pass_ttft_vs_offload", "recompute_token_cost_vs_prefill",
        "retrieval_offload_vs_vllm_rps", "retrieval_after_miss_blended_share")
GUARD = ("kvplug_blend_audit", "kvplug_blend_audit_off")  # issue 18: guard_rps_ratio, opt-in
CONTENT = "ret_kvplug_blend_content"  # issue 21: against RET["blend"] on the same documents, opt-in
RAG_BLEND, RAG_OFFLOAD = "kvplug_blend_default", "kvplug_cpu"
RET = {"vllm": "ret_vllm", "offload": "ret_kvplug_cpu", "blend": "ret_kvplug_blend", "oracle": "ret_kvplug_blend_oracle"}
NB_AFTER = "nb_after"

DEFINITIONS = {
    "blend_vs_offload_rps": f"rag_sessions trace: requests/s of {RAG_BLEND} (offload + blend, kvplug's default "
                            f"blend settings) / requests/s of {RAG_OFFLOAD} (offload alone), same run",
    "retrieval_blend_vs_offload_rps": f"retrieval trace: requests/s of {RET['blend']} / {RET['offload']}",
    "retrieval_blend_share_of_oracle": f"retrieval trace: requests/s of {RET['blend']} / {RET['oracle']} (the same "
                                       "configuration with every document of the trace stored beforehand as a chunk)",
    "retrieval_blend_vs_vllm_rps": f"retrieval trace: requests/s of {RET['blend']} / {RET['vllm']} (vLLM alone)",
    "retrieval_repeat_share": "retrieval trace: document occurrences whose document appeared earlier in the trace "
                              "/ all document occurrences",
    "neighbours_hit_p50_ratio": f"neighbours case, server {NB_AFTER}: p50 TTFT of the CPU-tier hits in the 'blends' "
                                "phase (beside blended requests whose chunks are all cached, in new orders) / "
                                "their p50 TTFT in the 'alone' phase",
    "chunk_save_s_per_chunk": f"rag_sessions trace, {RAG_BLEND}: kvplug counter deltas over the timed trace, "
                              "chunk_save_seconds / saved_chunks (seconds spent saving chunks per saved chunk); "
                              "when the kvplug under test has no chunk_save_seconds counter: save_seconds (block "
                              "and chunk saves together, an upper bound) / saved_chunks, and a note says so",
    "cold_pass_ttft_vs_offload": f"retrieval servers' fresh pass (requests of documents the trace never holds: "
                                 f"nothing to blend, every chunk saved; --fresh-concurrency, default 1): mean TTFT "
                                 f"on {RET['blend']} / mean TTFT on {RET['offload']}",
    "recompute_token_cost_vs_prefill": f"blend seconds per recomputed token / vLLM's prefill seconds per token, "
                                       f"both measured in this run: numerator = blend_seconds / "
                                       f"blend_recomputed_tokens (kvplug counter deltas of {RET['blend']} over the "
                                       f"retrieval trace); denominator = sum of TTFT / sum of (prompt tokens - "
                                       f"vLLM prefix-cache hit tokens) over {RET['vllm']}'s fresh pass (vLLM alone "
                                       f"prefilling new documents, one request at a time at the default "
                                       f"--fresh-concurrency 1; TTFT also holds the HTTP round trip and the first "
                                       f"token's sampling)",
    "retrieval_offload_vs_vllm_rps": f"retrieval trace: requests/s of {RET['offload']} / {RET['vllm']}",
    "retrieval_after_miss_blended_share": f"retrieval trace, {RET['blend']}: cached-chunk tokens after a missed "
                                          "chunk that were blended / (those blended + those vLLM prefilled): "
                                          "blend_tokens_after_miss_blended / (blend_tokens_after_miss_blended + "
                                          "blend_tokens_after_miss), kvplug counter deltas over the trace",
    "content_vs_separator_blended_share": f"retrieval trace: blended-token share (blend_tokens / prompt tokens) of "
                                          f"{CONTENT} (documents joined by blank lines, chunking: content) / that of "
                                          f"ret_kvplug_blend (the same documents joined by separators)",
    "content_vs_separator_rps": f"retrieval trace: requests/s of {CONTENT} / ret_kvplug_blend",
    "chunking_ms_per_request_32k": "the scheduler's content chunking of one 32,768-token chat prompt (chunk spans and "
                                   "their keys, documents joined by blank lines), ms, median of 10, measured after the "
                                   "servers in the same run (benchmarks/chunking.py's timing)",
    "guard_rps_ratio": f"rag_sessions trace: requests/s of {GUARD[0]} (blend_audit_rate 0.01) / {GUARD[1]} "
                       "(blend_audit_rate 0); present only when that pair was selected (--configs)",
}


class Missing(Exception):
    """An input of a headline figure is absent: the message is the note."""


def _rps(configs: dict, name: str, where: str) -> float:
    row = configs.get(name)
    if not row:
        raise Missing(f"{name} did not run on the {where} trace")
    return row["requests_per_s"]


def _div(a: float, b: float, what: str) -> float:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        raise Missing(f"{what}: an input is missing (NaN)")
    if b == 0:
        raise Missing(f"{what}: the denominator is 0")
    return a / b


def _counters(details: dict, name: str, trace: str) -> dict:
    d = details.get(name)
    if not d or not (d.get("counters") or {}).get("kvplug"):
        raise Missing(f"no kvplug counters of {name} on the {trace} trace")
    return d["counters"]["kvplug"]


def _need(counters: dict, key: str, name: str) -> float:
    if key not in counters:
        raise Missing(f"the kvplug under test has no counter {key} (vllm:kvplug_{key}_total) on {name}")
    return counters[key]


def _retrieval(report: dict) -> dict:
    sec = report.get("retrieval")
    if not sec:
        raise Missing("the retrieval trace did not run")
    return sec


def _fresh(report: dict, name: str) -> dict:
    f = _retrieval(report)["fresh_pass"].get(name)
    if not f or not f["requests"]:
        raise Missing(f"no fresh pass on {name}")
    return f


# ---------------------------------------------------------------- one function per figure
def blend_vs_offload_rps(r: dict, notes: dict) -> float:
    c = r.get("configs") or {}
    return _div(_rps(c, RAG_BLEND, "rag_sessions"), _rps(c, RAG_OFFLOAD, "rag_sessions"), "blend_vs_offload_rps")


def _ret_ratio(a: str, b: str):
    def f(r: dict, notes: dict) -> float:
        c = _retrieval(r)["configs"]
        return _div(_rps(c, RET[a], "retrieval"), _rps(c, RET[b], "retrieval"), f"{RET[a]} / {RET[b]}")
    return f


def retrieval_repeat_share(r: dict, notes: dict) -> float:
    w = _retrieval(r)["workload"]
    if w["repeat_share"] < 0.6:
        notes["retrieval_repeat_share"] = (f"below the 0.6 issue 17 asks of its trace: {w['requests']} requests are "
                                           "too few for the documents to recur (the 48-request default gives 0.72)")
    return w["repeat_share"]


def neighbours_hit_p50_ratio(r: dict, notes: dict) -> float:
    c = ((r.get("neighbours") or {}).get("configs") or {}).get(NB_AFTER)
    if not c:
        raise Missing(f"the neighbours server {NB_AFTER} did not run")
    ph = c["phases"]
    if "blends" not in ph:
        raise Missing(f"{NB_AFTER} has no 'blends' phase")
    return _div(ph["blends"]["hit_ttft_p50_s"], ph["alone"]["hit_ttft_p50_s"], "neighbours_hit_p50_ratio")


def chunk_save_s_per_chunk(r: dict, notes: dict) -> float:
    kv = _counters(r.get("config_details") or {}, RAG_BLEND, "rag_sessions")
    chunks = _need(kv, "saved_chunks", RAG_BLEND)
    if "chunk_save_seconds" in kv:
        return _div(kv["chunk_save_seconds"], chunks, "chunk_save_s_per_chunk")
    notes["chunk_save_s_per_chunk"] = ("the kvplug under test has no chunk_save_seconds counter: save_seconds "
                                       "(block and chunk saves together) / saved_chunks, an upper bound")
    return _div(_need(kv, "save_seconds", RAG_BLEND), chunks, "chunk_save_s_per_chunk")


def cold_pass_ttft_vs_offload(r: dict, notes: dict) -> float:
    return _div(_fresh(r, RET["blend"])["ttft_mean_s"], _fresh(r, RET["offload"])["ttft_mean_s"],
                "cold_pass_ttft_vs_offload")


def prefill_s_per_token(r: dict) -> float:
    """vLLM alone's prefill seconds per computed prompt token over its fresh pass."""
    f = _fresh(r, RET["vllm"])
    ttft = [t for t in f["ttft_s"] if t is not None]
    if len(ttft) != f["requests"]:
        raise Missing(f"{RET['vllm']}'s fresh pass has failed requests")
    hits = (f["counters"].get("prefix_cache") or {}).get("hits", 0.0)
    return _div(sum(ttft), f["prompt_tokens"] - hits, "prefill seconds per token")


def recompute_token_cost_vs_prefill(r: dict, notes: dict) -> float:
    kv = _counters(_retrieval(r)["config_details"], RET["blend"], "retrieval")
    per_token = _div(_need(kv, "blend_seconds", RET["blend"]), _need(kv, "blend_recomputed_tokens", RET["blend"]),
                     "blend seconds per recomputed token")
    return _div(per_token, prefill_s_per_token(r), "recompute_token_cost_vs_prefill")


def retrieval_after_miss_blended_share(r: dict, notes: dict) -> float:
    kv = _counters(_retrieval(r)["config_details"], RET["blend"], "retrieval")
    blended = _need(kv, "blend_tokens_after_miss_blended", RET["blend"])
    return _div(blended, blended + _need(kv, "blend_tokens_after_miss", RET["blend"]),
                "retrieval_after_miss_blended_share (no cached chunk came after a missed one)")


def guard_rps_ratio(r: dict, notes: dict) -> float:
    c = r.get("configs") or {}
    return _div(_rps(c, GUARD[0], "rag_sessions"), _rps(c, GUARD[1], "rag_sessions"), "guard_rps_ratio")


def _blended_share(r: dict, name: str) -> float:
    sec = _retrieval(r)
    kv = _counters(sec["config_details"], name, "retrieval")
    prompt = sum(q.get("prompt_tokens") or 0 for q in sec["requests"].get(name, []) if not q.get("error"))
    return _div(_need(kv, "blend_tokens", name), prompt, f"{name} blended-token share")


def content_vs_separator_blended_share(r: dict, notes: dict) -> float:
    return _div(_blended_share(r, CONTENT), _blended_share(r, RET["blend"]), "content_vs_separator_blended_share")


def content_vs_separator_rps(r: dict, notes: dict) -> float:
    c = _retrieval(r)["configs"]
    return _div(_rps(c, CONTENT, "retrieval"), _rps(c, RET["blend"], "retrieval"), "content_vs_separator_rps")


def chunking_ms_per_request_32k(r: dict, notes: dict) -> float:
    rows = [t for t in _retrieval(r).get("chunking_time") or [] if t["chunking"] == "content" and t["tokens"] == 32768]
    if not rows:
        raise Missing("no chunking time at 32K tokens in the retrieval section")
    return rows[0]["spans_and_keys_ms"]


FIGURES = {"blend_vs_offload_rps": blend_vs_offload_rps,
           "retrieval_blend_vs_offload_rps": _ret_ratio("blend", "offload"),
           "retrieval_blend_share_of_oracle": _ret_ratio("blend", "oracle"),
           "retrieval_blend_vs_vllm_rps": _ret_ratio("blend", "vllm"),
           "retrieval_repeat_share": retrieval_repeat_share, "neighbours_hit_p50_ratio": neighbours_hit_p50_ratio,
           "chunk_save_s_per_chunk": chunk_save_s_per_chunk, "cold_pass_ttft_vs_offload": cold_pass_ttft_vs_offload,
           "recompute_token_cost_vs_prefill": recompute_token_cost_vs_prefill,
           "retrieval_offload_vs_vllm_rps": _ret_ratio("offload", "vllm"),
           "retrieval_after_miss_blended_share": retrieval_after_miss_blended_share}


def _guard_selected(report: dict) -> bool:
    names = set(report.get("configs") or {}) | set(report.get("failed_configs") or [])
    return bool(names & set(GUARD))


def details(report: dict) -> dict:
    """Inputs worth seeing beside the headline: vLLM's prefill s/token and every blend row's chunk saves."""
    out = {}
    try:
        out["prefill_s_per_token"] = prefill_s_per_token(report)
    except Missing as e:
        out["prefill_s_per_token"] = None
        out["prefill_s_per_token_note"] = str(e)
    rows = {}
    for trace, d in (("rag_sessions", report.get("config_details") or {}),
                     ("retrieval", (report.get("retrieval") or {}).get("config_details") or {})):
        for name, c in d.items():
            kv = (c.get("counters") or {}).get("kvplug") or {}
            if kv.get("saved_chunks"):
                rows[name] = {"trace": trace, "saved_chunks": kv["saved_chunks"],
                              "chunk_save_seconds": kv.get("chunk_save_seconds"), "save_seconds": kv.get("save_seconds")}
    out["chunk_saves"] = rows
    return out


def headline(report: dict) -> tuple[dict, dict, dict]:
    """(values, notes, details): every KEY (None + a note when an input is missing); guard_rps_ratio
    when the guard pair was selected."""
    figures = dict(FIGURES)
    if _guard_selected(report):
        figures["guard_rps_ratio"] = guard_rps_ratio
    ret = report.get("retrieval") or {}
    if CONTENT in set(ret.get("configs") or {}) | set(ret.get("failed_configs") or []):
        figures["content_vs_separator_blended_share"] = content_vs_separator_blended_share
        figures["content_vs_separator_rps"] = content_vs_separator_rps
        figures["chunking_ms_per_request_32k"] = chunking_ms_per_request_32k
    values, notes = {}, {}
    for name, fn in figures.items():
        try:
            v = fn(report, notes)
            values[name] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
            if values[name] is None:
                notes.setdefault(name, "an input is NaN")
        except Missing as e:
            values[name], notes[name] = None, str(e)
    return values, notes, details(report)
