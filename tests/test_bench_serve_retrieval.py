"""The serve benchmark's retrieval side without a server (benchmarks/serve_configs.py,
serve_traces.py, serve_retrieval.py, serve_headline.py, serve_vllm_bench.py): the configuration
registry, the command line (traces, demo, backwards compatibility), the oracles' warm-up prompts,
the working sets, the answers' agreement, the headline from canned results (and null + a note for
every figure whose input is missing), and the vllm bench serve comparison."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve  # noqa: E402
import serve_headline  # noqa: E402
import serve_retrieval  # noqa: E402
import serve_traces  # noqa: E402
import serve_vllm_bench  # noqa: E402
from workloads import SEPARATOR, retrieval  # noqa: E402

RET = ["ret_vllm", "ret_kvplug_cpu", "ret_kvplug_blend", "ret_kvplug_blend_oracle"]
PLAN = serve.Plan(working_set_bytes=400 << 20, evict_working_set_bytes=100 << 20, work_dir="/w",
                  ret_prefix_bytes=1000 << 20, ret_chunk_bytes=300 << 20)


# ---------------------------------------------------------------- registry
def test_retrieval_configs_registered_with_valid_extra_config():
    from kvplug.config import KVPlugConfig

    cfgs = {n: serve.CONFIGS[n] for n in RET}
    assert all(c.group == "retrieval" for c in cfgs.values())
    assert cfgs["ret_vllm"].extra(PLAN) is None
    assert [n for n, c in cfgs.items() if c.fresh_pass] == RET[:3]
    assert [n for n, c in cfgs.items() if c.prewarm] == ["ret_kvplug_blend_oracle"]
    assert cfgs["ret_kvplug_blend_oracle"].prewarm == "documents"
    cpu = KVPlugConfig.from_dict(cfgs["ret_kvplug_cpu"].extra(PLAN))
    assert cpu.tiers.cpu_bytes >= 1.5 * PLAN.ret_prefix_bytes and not cpu.blend.enabled
    blend, oracle = cfgs["ret_kvplug_blend"].extra(PLAN), cfgs["ret_kvplug_blend_oracle"].extra(PLAN)
    assert blend == oracle  # the oracle is the same configuration, warmed
    assert blend["cpu_bytes"] >= 1.5 * (PLAN.ret_prefix_bytes + 2 * PLAN.ret_chunk_bytes)
    defaults = KVPlugConfig.from_dict({"blend": True}).blend
    assert KVPlugConfig.from_dict(blend).blend == defaults  # kvplug's default blend settings, nothing forced


def test_default_blend_rows_force_no_policy_and_the_guard_pair_is_opt_in():
    from kvplug.config import KVPlugConfig

    for name in ("kvplug_blend_default", "kvplug_blend_oracle"):
        extra = serve.CONFIGS[name].extra(PLAN)
        assert extra == {"cpu_bytes": serve.CONFIGS["kvplug_blend"].extra(PLAN)["cpu_bytes"], "blend": True}
        assert KVPlugConfig.from_dict(extra).blend == KVPlugConfig.from_dict({"blend": True}).blend
    assert serve.CONFIGS["kvplug_blend_oracle"].prewarm == "documents"
    assert serve.CONFIGS["kvplug_blend_audit"].extra(PLAN)["blend_audit_rate"] == 0.01
    assert serve.CONFIGS["kvplug_blend_audit_off"].extra(PLAN)["blend_audit_rate"] == 0.0
    for mode in (serve.MAIN_FULL, serve.MAIN_QUICK):
        assert "kvplug_blend_default" in mode and not {"kvplug_blend_audit", "kvplug_blend_audit_off"} & set(mode)
    args = serve.parse_args(["--configs", "vllm,kvplug_blend_audit,kvplug_blend_audit_off", "--policies", ""])
    assert [c.name for c in serve.selected(args)] == ["vllm", "kvplug_blend_audit", "kvplug_blend_audit_off"]


def test_register_rejects_unknown_prewarm():
    with pytest.raises(ValueError, match="prewarm='all'"):
        serve.register(serve.ServeConfig("x_prewarm", "main", lambda p: None, "bad", prewarm="all"))


# ---------------------------------------------------------------- command line
def test_traces_selection_and_backwards_compatible_command_lines():
    only_ret = serve.parse_args(["--traces", "retrieval"])
    assert [c.name for c in serve.selected(only_ret)] == RET
    # a command line written before the retrieval trace runs what it ran then
    old = serve.parse_args(["--configs", "vllm,kvplug_cpu", "--policies", ""])
    assert old.traces == "rag_sessions" and [c.name for c in serve.selected(old)] == ["vllm", "kvplug_cpu"]
    both = serve.parse_args(["--configs", "vllm", "--policies", "", "--ret-configs", "ret_vllm,ret_kvplug_cpu"])
    assert [c.name for c in serve.selected(both)] == ["vllm", "ret_vllm", "ret_kvplug_cpu"]
    with pytest.raises(SystemExit, match="ret_vllm"):
        serve.selected(serve.parse_args(["--traces", "retrieval", "--ret-configs", "ret_kvplug_cpu"]))
    with pytest.raises(SystemExit, match="other trace"):
        serve.selected(serve.parse_args(["--configs", "vllm,ret_kvplug_cpu", "--policies", ""]))
    with pytest.raises(SystemExit, match="unknown traces"):
        serve.parse_args(["--traces", "chat"])


def test_demo_presets_retrieval_only_float32_small():
    a = serve.parse_args(["--demo"])
    assert [c.name for c in serve.selected(a)] == list(serve_retrieval.DEMO)
    assert serve_neighbours_selected(a) == [] and a.dtype == "float32"
    assert a.json == serve.RESULTS / "serve_demo.json" and a.previous is None
    assert (a.ret_requests, a.ret_docs, a.max_tokens, a.concurrency) == (10, 20, 8, 2)
    assert (a.fresh_requests, a.bench_serve_requests) == (0, 0)
    a = serve.parse_args(["--demo", "--ret-requests", "4", "--dtype", "bfloat16"])
    assert (a.ret_requests, a.dtype) == (4, "bfloat16")  # what the command line says wins


def serve_neighbours_selected(a):
    import serve_neighbours
    return serve_neighbours.selected(a)


def test_server_args_fit_the_retrieval_trace_and_carry_the_dtype():
    args = serve.parse_args(["--dtype", "float32", "--max-tokens", "32"])
    traces = {"retrieval": ([], {"prompt_tokens_max": 6000})}
    rag = serve.server_args(args, 100, traces, "main")
    ret = serve.server_args(args, 100, traces, "retrieval")
    assert rag[rag.index("--max-model-len") + 1] == "5120"
    assert ret[ret.index("--max-model-len") + 1] == str(48 * 128)  # 6032 tokens, rounded up to a block
    assert ret[ret.index("--dtype") + 1] == "float32"
    assert ret[ret.index("--kv-cache-memory-bytes") + 1] == str(64 * 128 * 100)
    small = serve.parse_args(["--vllm-kv-blocks", "32"])
    with pytest.raises(SystemExit, match="vllm-kv-blocks 32"):
        serve.server_args(small, 100, traces, "retrieval")


# ---------------------------------------------------------------- traces
def _ret_trace(**kw):
    return retrieval.generate(**{"n": 12, "n_docs": 30, "doc_min_tokens": 8, "doc_max_tokens": 16, **kw})


def test_document_warm_prompts_hold_each_document_once_as_a_request_holds_it():
    trace = _ret_trace()
    prompts = serve_traces.document_warm_prompts(trace, "separator", retrieval.SYSTEM_PROMPT)
    docs = retrieval.documents(30, 8, 16, seed=0)
    order = list(dict.fromkeys(d for r in trace for d in r.doc_ids))
    assert prompts == [SEPARATOR.join([retrieval.SYSTEM_PROMPT, docs[d], serve_traces.WARM_QUESTION]) for d in order]
    rag = serve.rag_session_trace(n=10, n_contexts=4, n_docs=12, chunk_tokens=16, k_min=2, k_max=3, zipf_docs=1.0,
                                  zipf_contexts=1.0, seed=1, max_tokens=4)
    rag_prompts = serve_traces.document_warm_prompts(rag, "separator", None)
    rag_docs = {d: t for r in rag for d, t in zip(r.doc_ids, r.prompt.split(SEPARATOR)[:-1])}
    assert len(rag_prompts) == len(rag_docs)
    for p in rag_prompts:  # both forms: first in the prompt, and after a separator (kvplug warm --blend)
        first, second, q = p.split(SEPARATOR)
        assert first == second and first in rag_docs.values() and q == serve_traces.WARM_QUESTION


def test_unique_prefix_tokens_counts_what_no_earlier_prompt_shares():
    ids = [[1, 2, 3, 4], [1, 2, 9], [1, 2, 3, 4, 5], [7]]
    assert serve_traces.unique_prefix_tokens(ids) == 4 + 1 + 1 + 1


def test_build_retrieval_info_and_fresh_pass(tmp_path):
    args = serve.parse_args(["--traces", "retrieval", "--ret-requests", "10", "--ret-docs", "30",
                             "--ret-doc-min-tokens", "8", "--ret-doc-max-tokens", "16", "--fresh-requests", "2"])
    tok = type("Tok", (), {"encode": staticmethod(lambda s, add_special_tokens=False: s.split())})()
    trace, fresh, info = serve_traces.build_retrieval(args, tok)
    assert len(trace) == 10 and len(fresh) == 2 and info["repeat_share"] == retrieval.repeat_share(trace)
    assert info["prompt_tokens_max"] == max(len(r.prompt.split()) for r in trace)
    assert info["system_prompt_tokens"] == len(retrieval.SYSTEM_PROMPT.split())
    assert not {d for r in fresh for d in r.doc_ids} & {d for r in trace for d in r.doc_ids}
    paths = serve_traces.export_custom(tmp_path, {"retrieval": trace})
    assert Path(paths["retrieval"]).read_text().count("\n") == 10


# ---------------------------------------------------------------- agreement
def test_wilson_interval_and_agreement():
    lo, hi = serve_retrieval.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert all(math.isnan(x) for x in serve_retrieval.wilson(0, 0))
    a = serve_retrieval.agreement(["abc", "abd", None, "xyz"], ["abc", "abc", "abc", "abc"])
    assert a["agreement_n"] == 3 and a["agreement_vs_vllm"] == pytest.approx(1 / 3)
    assert a["agreement_prefix_share"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert a["agreement_ci95"][0] < 1 / 3 < a["agreement_ci95"][1]


# ---------------------------------------------------------------- headline from canned results
def _stats(name, rps, group="retrieval"):
    return {"config": name, "group": group, "requests_per_s": rps, "output_tokens_per_s": 8 * rps,
            "ttft_p50_s": 1.0, "ttft_p90_s": 2.0}


def _run(name, rps, texts, kv=None, fresh=None, group="retrieval"):
    return {"stats": _stats(name, rps, group), "extra_config": {}, "description": name, "counters": {"kvplug": kv or {}},
            "requests": [{"text": t} for t in texts], **({"fresh_pass": fresh} if fresh else {})}


def _fresh(ttfts, prompt_tokens, hits):
    return {"requests": len(ttfts), "ttft_s": ttfts, "ttft_mean_s": sum(ttfts) / len(ttfts),
            "prompt_tokens": prompt_tokens, "counters": {"prefix_cache": {"hits": hits}}}


BLEND_KV = {"blend_seconds": 3.0, "blend_recomputed_tokens": 1000.0, "blend_tokens_after_miss": 300.0,
            "blend_tokens_after_miss_blended": 900.0, "saved_chunks": 20.0, "save_seconds": 4.0}


def canned_report():
    ret_runs = {"ret_vllm": _run("ret_vllm", 0.5, ["a", "b", "c", "d"], fresh=_fresh([2.0, 2.0], 4200, 200)),
                "ret_kvplug_cpu": _run("ret_kvplug_cpu", 0.45, ["a", "b", "c", "d"], {"saved_blocks": 9.0},
                                       _fresh([2.0, 2.2], 4200, 200)),
                "ret_kvplug_blend": _run("ret_kvplug_blend", 0.9, ["a", "b", "x", "d"], BLEND_KV,
                                         _fresh([2.2, 2.2], 4200, 200)),
                "ret_kvplug_blend_oracle": _run("ret_kvplug_blend_oracle", 1.2, ["a", "b", "c", "d"], BLEND_KV)}
    info = {"repeat_share": 0.72, "requests": 4}
    rag_kv = {"saved_chunks": 10.0, "chunk_save_seconds": 0.5, "save_seconds": 2.0}
    nb = {"configs": {"nb_after": {"phases": {"alone": {"hit_ttft_p50_s": 0.4}, "blends": {"hit_ttft_p50_s": 0.42}}}}}
    return {"configs": {"vllm": _stats("vllm", 0.5, "main"), "kvplug_cpu": _stats("kvplug_cpu", 0.8, "main"),
                        "kvplug_blend_default": _stats("kvplug_blend_default", 0.88, "main")},
            "config_details": {"kvplug_blend_default": {"counters": {"kvplug": rag_kv}}},
            "failed_configs": [], "neighbours": nb,
            "retrieval": serve_retrieval.section(ret_runs, info, RET)}


def test_headline_from_canned_results_has_exactly_issue_17s_names():
    values, notes, details = serve_headline.headline(canned_report())
    assert tuple(values) == serve_headline.KEYS and notes == {}
    expect = {"blend_vs_offload_rps": 0.88 / 0.8, "retrieval_blend_vs_offload_rps": 0.9 / 0.45,
              "retrieval_blend_share_of_oracle": 0.9 / 1.2, "retrieval_blend_vs_vllm_rps": 0.9 / 0.5,
              "retrieval_repeat_share": 0.72, "neighbours_hit_p50_ratio": 0.42 / 0.4,
              "chunk_save_s_per_chunk": 0.05, "cold_pass_ttft_vs_offload": 2.2 / 2.1,
              # (3 s / 1000 recomputed tokens) / (4 s of TTFT / (4200 - 200) prefilled tokens)
              "recompute_token_cost_vs_prefill": 0.003 / 0.001,
              "retrieval_offload_vs_vllm_rps": 0.45 / 0.5, "retrieval_after_miss_blended_share": 0.75}
    assert values == pytest.approx(expect)
    assert details["prefill_s_per_token"] == pytest.approx(0.001)
    assert set(details["chunk_saves"]) == {"kvplug_blend_default", "ret_kvplug_blend", "ret_kvplug_blend_oracle"}
    assert set(serve_headline.DEFINITIONS) == set(serve_headline.KEYS) | {
        "guard_rps_ratio", "content_vs_separator_blended_share", "content_vs_separator_rps",
        "chunking_ms_per_request_32k"}


def test_content_chunking_row_is_compared_on_its_own_prompts_and_headlined_when_selected():
    rep = canned_report()
    assert "content_vs_separator_rps" not in serve_headline.headline(rep)[0]
    runs = {"ret_vllm": _run("ret_vllm", 0.5, ["a", "b"]),
            "ret_vllm_newlines": {**_run("ret_vllm_newlines", 0.5, ["p", "q"]), "join": "newlines"},
            "ret_kvplug_blend": _run("ret_kvplug_blend", 0.9, ["a", "b"], {"blend_tokens": 500.0}),
            "ret_kvplug_blend_content": {**_run("ret_kvplug_blend_content", 0.81, ["p", "x"], {"blend_tokens": 400.0}),
                                         "join": "newlines"}}
    for name, r in runs.items():
        r["requests"] = [{**q, "prompt_tokens": 1000} for q in r["requests"]]
    sec = serve_retrieval.section(runs, {"repeat_share": 0.7, "requests": 2}, list(runs))
    content = sec["configs"]["ret_kvplug_blend_content"]
    assert content["agreement_reference"] == "ret_vllm_newlines" and content["agreement_vs_vllm"] == 0.5
    assert sec["configs"]["ret_kvplug_blend"]["agreement_reference"] == "ret_vllm"
    values, notes, _ = serve_headline.headline({"configs": {}, "retrieval": sec})
    assert values["content_vs_separator_rps"] == pytest.approx(0.81 / 0.9)
    assert values["content_vs_separator_blended_share"] == pytest.approx((400 / 2000) / (500 / 2000))
    assert values["chunking_ms_per_request_32k"] is None and "no chunking time" in notes["chunking_ms_per_request_32k"]
    sec["chunking_time"] = [{"tokens": 32768, "chunking": "separator", "spans_and_keys_ms": 3.0},
                            {"tokens": 32768, "chunking": "content", "spans_and_keys_ms": 8.5}]
    assert serve_headline.headline({"configs": {}, "retrieval": sec})[0]["chunking_ms_per_request_32k"] == 8.5


def test_a_retrieval_trace_rejoined_with_blank_lines_has_no_separator_left():
    from workloads.retrieval import JOINS, generate

    trace = generate(n=3, n_docs=12, doc_min_tokens=20, doc_max_tokens=40, k_min=2, k_max=3)
    assert all(JOINS["separator"] in r.prompt for r in trace)
    again = serve.rejoined(trace, "separator", "newlines")
    assert all(JOINS["separator"] not in r.prompt and "\n\n" in r.prompt for r in again)
    assert serve.rejoined(trace, "separator", None) is trace


def test_headline_nulls_with_notes_when_inputs_are_missing():
    rep = canned_report()
    del rep["retrieval"]["configs"]["ret_kvplug_blend_oracle"]
    del rep["retrieval"]["config_details"]["ret_kvplug_blend"]["counters"]["kvplug"]["blend_tokens_after_miss_blended"]
    rep["retrieval"]["fresh_pass"].pop("ret_vllm")
    del rep["config_details"]["kvplug_blend_default"]["counters"]["kvplug"]["chunk_save_seconds"]
    del rep["neighbours"]
    values, notes, _ = serve_headline.headline(rep)
    missing = {"retrieval_blend_share_of_oracle", "retrieval_after_miss_blended_share",
               "recompute_token_cost_vs_prefill", "neighbours_hit_p50_ratio"}
    assert {k for k, v in values.items() if v is None} == missing
    assert "ret_kvplug_blend_oracle did not run" in notes["retrieval_blend_share_of_oracle"]
    assert "blend_tokens_after_miss_blended" in notes["retrieval_after_miss_blended_share"]
    assert "no fresh pass on ret_vllm" in notes["recompute_token_cost_vs_prefill"]
    assert "nb_after" in notes["neighbours_hit_p50_ratio"]
    # the fallback is a figure, with a note that says what it is
    assert values["chunk_save_s_per_chunk"] == pytest.approx(0.2) and "upper bound" in notes["chunk_save_s_per_chunk"]
    nothing, notes, _ = serve_headline.headline({"configs": {}})
    assert tuple(nothing) == serve_headline.KEYS and all(v is None for v in nothing.values())
    assert set(notes) == set(serve_headline.KEYS)


def test_headline_zero_denominator_and_guard_ratio_only_when_selected():
    rep = canned_report()
    rep["retrieval"]["config_details"]["ret_kvplug_blend"]["counters"]["kvplug"].update(
        blend_tokens_after_miss=0.0, blend_tokens_after_miss_blended=0.0)
    values, notes, _ = serve_headline.headline(rep)
    assert values["retrieval_after_miss_blended_share"] is None and "denominator is 0" in notes[
        "retrieval_after_miss_blended_share"]
    assert "guard_rps_ratio" not in values
    rep["configs"]["kvplug_blend_audit"] = _stats("kvplug_blend_audit", 0.86, "main")
    rep["configs"]["kvplug_blend_audit_off"] = _stats("kvplug_blend_audit_off", 0.88, "main")
    assert serve_headline.headline(rep)[0]["guard_rps_ratio"] == pytest.approx(0.86 / 0.88)
    rep["retrieval"]["workload"]["repeat_share"] = 0.45  # a short (quick) trace: the figure, and a note
    values, notes, _ = serve_headline.headline(rep)
    assert values["retrieval_repeat_share"] == 0.45 and "below the 0.6" in notes["retrieval_repeat_share"]
    del rep["configs"]["kvplug_blend_audit"]
    rep["failed_configs"] = ["kvplug_blend_audit"]  # selected, failed start-up (a kvplug without the key)
    values, notes, _ = serve_headline.headline(rep)
    assert values["guard_rps_ratio"] is None and "kvplug_blend_audit did not run" in notes["guard_rps_ratio"]


def test_retrieval_section_ratios_oracle_share_and_agreement():
    sec = canned_report()["retrieval"]
    blend = sec["configs"]["ret_kvplug_blend"]
    assert blend["throughput_ratio_vs_vllm"] == pytest.approx(1.8)
    assert blend["share_of_oracle"] == pytest.approx(0.75)
    assert blend["agreement_vs_vllm"] == pytest.approx(0.75) and blend["agreement_n"] == 4
    assert sec["configs"]["ret_kvplug_cpu"]["agreement_vs_vllm"] == 1.0
    assert set(sec["fresh_pass"]) == set(RET[:3]) and sec["failed_configs"] == []


def test_build_report_writes_retrieval_section_and_headline(capsys):
    args = serve.parse_args(["--traces", "retrieval"])
    args.model, args.kvplug_source = "m", {}
    rep = canned_report()
    runs = {n: {**_run(n, c["requests_per_s"], ["a"]), "server_start_s": 1.0, "omp_core_ids": "[0]", "load": {}}
            for n, c in rep["retrieval"]["configs"].items()}
    info = {"name": "retrieval", "requests": 1, "concurrency": 4, "repeat_share": 0.7, "prompt_tokens_mean": 10.0,
            "distinct_documents": 3, "first_document_repeat_share": 0.0, "fresh": []}
    report = serve.build_report(args, runs, {"retrieval": ([], info)}, PLAN, 1,
                                {g: ["--dtype", "float32"] for g in serve.GROUPS}, 1.0, {})
    assert report["configs"] == {} and set(report["retrieval"]["configs"]) == set(RET)
    assert "fresh" not in report["retrieval"]["workload"] and report["dtype"] == "bfloat16"
    assert report["headline"]["retrieval_blend_vs_offload_rps"] == pytest.approx(2.0)
    assert report["headline"]["blend_vs_offload_rps"] is None and report["headline_notes"]["blend_vs_offload_rps"]
    assert report["definitions"]["headline"] == serve_headline.DEFINITIONS
    serve.print_report(report)
    out = capsys.readouterr().out
    assert "retrieval trace: 1 requests" in out and "retrieval_blend_share_of_oracle" in out


# ---------------------------------------------------------------- vllm bench serve
def test_bench_command_replays_the_trace_as_this_script_sends_it():
    cmd = serve_vllm_bench.bench_command("http://h:1", "/m", Path("/d.jsonl"), 8, 32, 4, "s1", Path("/r"), "out.json")
    i = cmd.index("bench")
    args = cmd[i:]
    for flag in ("--skip-chat-template", "--disable-shuffle", "--ignore-eos"):
        assert flag in args
    pairs = {"--dataset-name": "custom", "--num-prompts": "8", "--custom-output-len": "32", "--max-concurrency": "4",
             "--temperature": "0", "--ready-check-timeout-sec": "0", "--extra-body": '{"cache_salt": "s1"}',
             "--request-rate": "inf"}
    for k, v in pairs.items():
        assert args[args.index(k) + 1] == v


def test_bench_compare_ratio_and_noise():
    ours = [{"requests_per_s": 1.0, "ttft_mean_s": 2.0}, {"requests_per_s": 1.1, "ttft_mean_s": 2.0}]
    theirs = [{"requests_per_s": 1.04, "ttft_mean_s": 2.1}, {"requests_per_s": 1.06, "ttft_mean_s": 1.9}]
    c = serve_vllm_bench.compare(ours, theirs)
    assert c["ratio"] == pytest.approx(1.05 / 1.05) and c["noise"] == pytest.approx(0.1 / 1.05)
    assert c["within_noise"] is True and c["ttft_mean_ratio"] == pytest.approx(1.0)
    far = serve_vllm_bench.compare(ours, [{"requests_per_s": 1.5, "ttft_mean_s": 1.0}] * 2)
    assert far["within_noise"] is False
    failed = serve_vllm_bench.compare(ours, [{"error": "vllm bench serve failed (pandas)"}])
    assert failed["ratio"] is None and "no successful" in failed["note"]


def test_after_trace_hook_runs_the_fresh_pass_and_the_bench_check_where_asked(monkeypatch, tmp_path):
    import serve_vllm_bench as vb
    calls = []
    monkeypatch.setattr(serve_retrieval, "fresh_pass", lambda url, model, fresh, conc, desc: calls.append(
        ("fresh", desc, len(fresh), conc)) or {"requests": len(fresh)})
    monkeypatch.setattr(vb, "check", lambda url, model, reqs, conc, work, env, config="": calls.append(
        ("bench", config, len(reqs))) or {"config": config})
    args = serve.parse_args(["--traces", "retrieval", "--bench-serve-requests", "3", "--fresh-concurrency", "1"])
    args.model = "m"
    trace, fresh = _ret_trace(), _ret_trace(n=2)
    after = serve.after_trace_hook(args, fresh, trace, tmp_path, {})
    out = {n: after("http://x", serve.CONFIGS[n]) for n in RET}
    assert set(out["ret_vllm"]) == {"fresh_pass", "vllm_bench"} and set(out["ret_kvplug_cpu"]) == {"fresh_pass"}
    assert out["ret_kvplug_blend_oracle"] == {}  # its documents are all stored: no fresh pass
    assert calls[:2] == [("fresh", "ret_vllm fresh", 2, 1), ("bench", "ret_vllm", 3)]


def test_vllm_kv_cache_tokens_from_the_log():
    import serving
    log = "INFO [kv_cache_utils.py:2327] CPU KV cache size: 8,192 tokens, Maximum concurrency for 5,120 tokens"
    assert serving.kv_cache_tokens(log) == 8192 and serving.kv_cache_tokens("nothing") is None


def test_bench_check_runs_nothing_without_pandas(tmp_path, monkeypatch):
    import subprocess as sp
    monkeypatch.setattr(serve_vllm_bench, "run_ours", lambda *a, **k: pytest.fail("ran without pandas"))
    monkeypatch.setattr(serve_vllm_bench.subprocess, "run", lambda cmd, **kw: sp.CompletedProcess(cmd, 1, "", "No module"))
    res = serve_vllm_bench.check("http://x", "m", _ret_trace(n=2), 2, tmp_path, {}, config="ret_vllm")
    assert res["ratio"] is None and "pandas" in res["note"] and res["ours"] == res["vllm_bench"] == []
    serve_vllm_bench.print_result(res)
