"""Pure parts of benchmarks/serve.py, serve_report.py, serve_neighbours.py and plots.py (no vLLM
server): stats aggregation, hit-rate math, ITL from chunk timestamps, the configuration registry,
the rag_sessions trace, the oracle's warm-up prompts and share, the comparison with a previous
report, the neighbours case's requests, phase figures and tables, and the plots on fake data."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve  # noqa: E402
import serve_configs  # noqa: E402
import serve_neighbours  # noqa: E402
import serve_report  # noqa: E402
from workloads import SEPARATOR  # noqa: E402


def _timed(i, ttft, chunks, n_tok=None, prompt=100, error=None):
    return serve.Timed(index=i, start_s=0.0, ttft_s=ttft, total_s=(chunks[-1] if chunks else 0.0),
                       chunk_times=list(chunks), n_tokens=len(chunks) if n_tok is None else n_tok,
                       prompt_tokens=prompt, error=error)


def test_itl_from_chunk_timestamps():
    assert serve.itl_from_chunks([0.5, 0.6, 0.8, 0.9]) == pytest.approx(0.4 / 3)
    assert serve.itl_from_chunks([1.0, 3.0]) == pytest.approx(2.0)
    assert serve.itl_from_chunks([0.5]) is None
    assert serve.itl_from_chunks([]) is None


def test_aggregate_percentiles_throughput_and_errors():
    res = [_timed(0, 1.0, [1.0, 1.1, 1.2]), _timed(1, 2.0, [2.0, 2.2, 2.4]),
           _timed(2, 3.0, [3.0, 3.3]), _timed(3, None, [], error="APIConnectionError: boom")]
    s = serve.aggregate(res, wall_s=4.0)
    assert s["requests"] == 4 and s["errors"] == 1
    assert s["ttft_p50_s"] == pytest.approx(2.0)
    assert s["ttft_p90_s"] == pytest.approx(2.8)
    assert s["ttft_p99_s"] == pytest.approx(2.98)
    assert s["ttft_mean_s"] == pytest.approx(2.0)
    assert s["itl_mean_s"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert s["requests_per_s"] == pytest.approx(3 / 4.0)  # failed requests do not count
    assert s["output_tokens"] == 8 and s["output_tokens_per_s"] == pytest.approx(2.0)
    assert s["prompt_tokens"] == 300 and s["prompt_tokens_per_s"] == pytest.approx(75.0)


def test_aggregate_empty_is_nan_not_error():
    s = serve.aggregate([], wall_s=0.0)
    assert s["requests"] == 0 and math.isnan(s["ttft_p50_s"]) and math.isnan(s["requests_per_s"])


def test_hit_rates_from_counter_deltas():
    kv = {"lookup_tokens": 1000.0, "cpu_hit_tokens": 500.0, "disk_hit_tokens": 250.0, "miss_tokens": 250.0}
    h = serve.hit_rates(kv, {"hits": 300.0, "queries": 1200.0})
    assert h["cpu_hit_rate"] == pytest.approx(0.5) and h["disk_hit_rate"] == pytest.approx(0.25)
    assert h["remote_hit_rate"] == 0.0 and h["kvplug_hit_rate"] == pytest.approx(0.75)
    assert h["vllm_prefix_hit_rate"] == pytest.approx(0.25)
    assert h["lookup_tokens"] == 1000.0 and h["hit_tokens"] == 750.0
    none = serve.hit_rates({}, {})  # vLLM alone: no kvplug counters at all
    assert math.isnan(none["kvplug_hit_rate"]) and math.isnan(none["vllm_prefix_hit_rate"])


def test_ratios_vs_vllm():
    base = {"requests_per_s": 2.0, "output_tokens_per_s": 20.0, "ttft_p90_s": 4.0, "ttft_p50_s": 2.0}
    other = {"requests_per_s": 3.0, "output_tokens_per_s": 30.0, "ttft_p90_s": 1.0, "ttft_p50_s": 0.5}
    r = serve.with_ratios(other, base)
    assert r["throughput_ratio_vs_vllm"] == pytest.approx(1.5)
    assert r["tokens_per_s_ratio_vs_vllm"] == pytest.approx(1.5)
    assert r["ttft_p90_ratio_vs_vllm"] == pytest.approx(0.25) and r["ttft_p50_ratio_vs_vllm"] == 0.25


def test_registry_has_main_configs_and_every_policy():
    from kvplug.config import EVICTION_POLICIES

    assert {"vllm", "kvplug_cpu", "kvplug_cpu_disk"} <= set(serve.CONFIGS)
    assert set(serve.POLICIES) == set(EVICTION_POLICIES)
    plan = serve.Plan(working_set_bytes=1000 << 20, evict_working_set_bytes=400 << 20, work_dir="/w",
                      evict_cpu_frac=0.25)
    assert serve.CONFIGS["vllm"].extra(plan) is None
    assert serve.CONFIGS["kvplug_cpu"].extra(plan)["cpu_bytes"] > 1000 << 20
    disk = serve.CONFIGS["kvplug_cpu_disk"].extra(plan)
    assert disk["cpu_bytes"] < 1000 << 20 < disk["disk_bytes"] and disk["disk_path"] == "/w/disk"
    for p in serve.POLICIES:
        cfg = serve.CONFIGS[f"evict_{p}"]
        extra = cfg.extra(plan)
        assert cfg.group == "eviction" and cfg.policy == p
        assert extra == {"cpu_bytes": 100 << 20, "eviction_policy": p}  # 0.25 x 400 MiB, no disk


def test_register_rejects_duplicates_and_bad_groups():
    with pytest.raises(ValueError, match="already registered"):
        serve.register(serve.ServeConfig("vllm", "main", lambda p: None, "dup"))
    with pytest.raises(ValueError, match="group"):
        serve.register(serve.ServeConfig("x_blend", "blend", lambda p: None, "bad group"))


def test_blend_entry_is_one_register_call(monkeypatch):
    monkeypatch.setattr(serve_configs, "CONFIGS", dict(serve.CONFIGS))
    serve.register(serve.ServeConfig("kvplug_blend_0.15", "main",
                                     lambda p: {"cpu_bytes": 1, "blend": True, "recompute_ratio": 0.15}, "blend"))
    args = serve.parse_args(["--configs", "vllm,kvplug_blend_0.15", "--policies", ""])
    assert [c.name for c in serve.selected(args)] == ["vllm", "kvplug_blend_0.15"]


def test_selected_requires_vllm_and_known_names():
    with pytest.raises(SystemExit):
        serve.selected(serve.parse_args(["--configs", "kvplug_cpu"]))
    with pytest.raises(SystemExit):
        serve.selected(serve.parse_args(["--policies", "mru"]))


def test_quick_and_full_defaults():
    quick = serve.parse_args(["--quick"])
    names = [c.name for c in serve.selected(quick)]
    # 14 servers: the main group without the remote tier and the forced-policy blend rows (with
    # the oracle), three eviction policies, the retrieval trace's four, and the neighbours case
    # before and after
    ret = ["ret_vllm", "ret_kvplug_cpu", "ret_kvplug_blend", "ret_kvplug_blend_oracle"]
    assert names == ["vllm", "kvplug_cpu", "kvplug_cpu_disk", "kvplug_blend_default", "kvplug_oracle",
                     "evict_lru", "evict_s3fifo", "evict_cost_aware"] + ret
    assert (quick.ret_requests, quick.fresh_requests, quick.bench_serve_requests) == (8, 2, 0)
    assert [c.name for c in serve_neighbours.selected(quick)] == ["nb_before", "nb_after"]
    assert quick.nb_sizes == serve_neighbours.QUICK
    assert (quick.requests, quick.evict_requests, quick.evict_cpu_frac) == (16, 16, 0.5)
    assert (quick.contexts, quick.max_tokens) == (8, 16)
    full = serve.parse_args([])
    names = [c.name for c in serve.selected(full)]
    assert names == ["vllm", "kvplug_cpu", "kvplug_cpu_disk", "kvplug_cpu_remote", "kvplug_blend",
                     "kvplug_blend_adaptive", "kvplug_blend_query", "kvplug_blend_default", "kvplug_oracle",
                     "kvplug_blend_oracle"] + [f"evict_{p}" for p in serve.POLICIES] + ret
    assert (full.ret_requests, full.fresh_requests, full.bench_serve_requests) == (48, 6, 8)
    assert (full.dtype, full.concurrency, full.ret_docs, full.ret_doc_min_tokens, full.ret_doc_max_tokens) == \
        ("bfloat16", 4, 200, 256, 768)
    assert [c.name for c in serve_neighbours.selected(full)] == ["nb_before", "nb_sync", "nb_after"]
    assert full.nb_sizes == serve_neighbours.FULL and full.before_rev == serve_neighbours.BEFORE_REV
    assert (full.requests, full.evict_requests, full.evict_cpu_frac) == (64, 64, 0.35)
    # explicit values override either mode; '' skips the eviction group
    a = serve.parse_args(["--quick", "--requests", "4", "--evict-requests", "40", "--evict-cpu-frac", "0.2",
                          "--configs", "vllm,kvplug_blend", "--policies", ""])
    assert (a.requests, a.evict_requests, a.evict_cpu_frac) == (4, 4, 0.2)  # evict_requests <= requests
    assert [c.name for c in serve.selected(a)] == ["vllm", "kvplug_blend"]


@pytest.mark.parametrize("name,policy", [("kvplug_blend", "fixed"), ("kvplug_blend_adaptive", "adaptive")])
def test_blend_configs_registered_with_valid_extra_config(name, policy):
    from kvplug.config import KVPlugConfig

    cfg = serve.CONFIGS[name]
    assert cfg.group == "main" and cfg.policy is None
    plan = serve.Plan(working_set_bytes=400 << 20, evict_working_set_bytes=100 << 20, work_dir="/w")
    extra = cfg.extra(plan)
    assert extra["blend"] is True and extra["recompute_ratio"] == 0.15 and extra["recompute_policy"] == policy
    # one tier for blocks and chunks: kvplug_cpu's share for each kind
    assert extra["cpu_bytes"] >= 0.99 * 3 * plan.working_set_bytes
    c = KVPlugConfig.from_dict(extra)
    assert c.blend.enabled and c.blend.recompute_policy == policy and c.blend.recompute_ratio == 0.15
    assert c.tiers.cpu_bytes == extra["cpu_bytes"]
    assert c.blend.chunk_separator == SEPARATOR  # the rag trace's document separator


def test_blend_summary_from_counters():
    kv = {"lookup_tokens": 5000.0, "cpu_hit_tokens": 1000.0, "blend_requests": 4.0, "blend_tokens": 8000.0,
          "blend_recomputed_tokens": 1200.0, "blend_chunk_hits": 9.0, "blend_chunk_misses": 3.0,
          "blend_errors": 1.0, "blend_seconds": 2.0}
    b = serve.blend_summary(kv)
    assert b["blend_requests"] == 4.0 and b["blend_errors"] == 1.0 and b["blend_tokens"] == 8000.0
    assert b["blend_chunk_hit_rate"] == pytest.approx(0.75)
    assert b["blend_recomputed_frac"] == pytest.approx(0.15)
    assert b["blend_s_per_request"] == pytest.approx(0.5)
    none = serve.blend_summary({"lookup_tokens": 10.0})  # a server that does not blend
    assert none["blend_requests"] == 0.0 and math.isnan(none["blend_chunk_hit_rate"])
    assert math.isnan(none["blend_recomputed_frac"]) and math.isnan(none["blend_s_per_request"])


def test_report_has_blend_section_and_table(capsys):
    kv = {"blend_requests": 2.0, "blend_tokens": 1000.0, "blend_recomputed_tokens": 150.0,
          "blend_chunk_hits": 3.0, "blend_chunk_misses": 1.0, "blend_seconds": 0.4}

    def run(name, extra, counters):
        stats = {"config": name, "group": "main", "policy": None, **serve.aggregate([_timed(0, 1.0, [1.0, 1.1])], 2.0),
                 **serve.hit_rates(counters, {}), **serve.blend_summary(counters)}
        return {"stats": stats, "extra_config": extra, "description": name, "server_start_s": 1.0,
                "omp_core_ids": "[0]", "load": {}, "counters": {"kvplug": counters}, "requests": []}

    plan = serve.Plan(working_set_bytes=1 << 20, evict_working_set_bytes=1 << 20, work_dir="/w")
    args = serve.parse_args(["--configs", "vllm,kvplug_blend", "--policies", "", "--requests", "1"])
    args.model, args.kvplug_source = "m", {}
    runs = {"vllm": run("vllm", None, {}), "kvplug_blend": run("kvplug_blend", {"blend": True}, kv)}
    rep = serve.build_report(args, runs, {"requests": 1, "concurrency": 4}, plan, 1, [], 1.0, {})
    assert list(rep["blend"]) == ["kvplug_blend"]
    b = rep["blend"]["kvplug_blend"]
    assert b["blend_requests"] == 2.0 and b["blend_chunk_hit_rate"] == pytest.approx(0.75)
    assert b["blend_recomputed_frac"] == pytest.approx(0.15)
    assert rep["configs"]["kvplug_blend"]["blend_chunk_hit_rate"] == pytest.approx(0.75)
    serve.print_report(rep)
    out = capsys.readouterr().out
    assert "blend_chunk_hit_rate" in out and "kvplug_blend" in out


def test_rag_session_trace_is_deterministic_and_reuses_prefixes():
    kw = dict(n=30, n_contexts=6, n_docs=20, chunk_tokens=64, k_min=4, k_max=8, zipf_docs=1.0,
              zipf_contexts=1.0, seed=3, max_tokens=8)
    a, b = serve.rag_session_trace(**kw), serve.rag_session_trace(**kw)
    assert a == b and len(a) == 30
    by_ctx = {}
    for r in a:
        ctx, q = r.prompt.rsplit(SEPARATOR, 1)
        assert q.startswith(f"Question {r.round + 1}: ") and 4 <= len(r.doc_ids) <= 8
        by_ctx.setdefault(r.session, set()).add(ctx)
    assert all(len(c) == 1 for c in by_ctx.values())  # one retrieved text per session
    assert len(by_ctx) < 30  # contexts repeat: real prefix reuse
    assert len({r.prompt for r in a}) == 30  # every request distinct
    assert serve.rag_session_trace(**{**kw, "seed": 4}) != a
    words = serve.unique_context_tokens(a, lambda s: len(s.split()))
    assert words == sum(len(next(iter(c)).split()) for c in by_ctx.values())


def _fake_report():
    cfg = lambda rps, p90, g="main", pol=None: {  # noqa: E731
        "group": g, "policy": pol, "requests_per_s": rps, "output_tokens_per_s": 16 * rps,
        "ttft_p50_s": p90 / 4, "ttft_p90_s": p90, "throughput_ratio_vs_vllm": rps / 0.5,
        "kvplug_hit_rate": 0.3 if pol else float("nan")}
    reqs = lambda k: [{"ttft_s": 0.1 * k * (1 + i % 5)} for i in range(12)]  # noqa: E731
    return {"workload": {"name": "rag_sessions", "requests": 12, "concurrency": 4, "eviction_requests": 8},
            "machine": {"cpu_model": "fake", "cpu_cores": 2}, "load_average": {"during": {"load1_mean": 1.5}},
            "sizing": {"evict_cpu_frac": 0.35},
            "configs": {"vllm": cfg(0.5, 4.0), "kvplug_cpu": cfg(0.9, 1.0)},
            "policies": {p: cfg(0.6, 2.0, "eviction", p) for p in serve.POLICIES},
            "blend": {"kvplug_blend": {"blend_requests": 10.0, "blend_chunk_hit_rate": 0.8,
                                       "blend_recomputed_frac": 0.15}},
            "requests": {"vllm": reqs(4), "kvplug_cpu": reqs(1),
                         **{f"evict_{p}": reqs(2) for p in serve.POLICIES}}}


def test_plots_write_pngs(tmp_path):
    import plots  # matplotlib comes with the test extra: no skip
    paths = plots.write_all(_fake_report(), str(tmp_path / "serve_"))
    assert [p.name for p in paths] == ["serve_ttft.png", "serve_throughput.png", "serve_policies.png",
                                       "serve_blend.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plots_without_policies_or_with_nan(tmp_path):
    import plots
    rep = _fake_report()
    rep["policies"], rep["blend"] = {}, {}
    rep["requests"]["vllm"] = [{"ttft_s": None}, {"ttft_s": float("nan")}]
    paths = plots.write_all(rep, str(tmp_path / "x_"))
    assert [p.name for p in paths] == ["x_ttft.png", "x_throughput.png"]


# ---------------------------------------------------------------- oracle and previous results
def test_oracle_is_kvplug_cpu_with_a_warm_up_pass():
    plan = serve.Plan(working_set_bytes=400 << 20, evict_working_set_bytes=100 << 20, work_dir="/w")
    oracle = serve.CONFIGS["kvplug_oracle"]
    assert oracle.group == "main" and oracle.prewarm and not serve.CONFIGS["kvplug_cpu"].prewarm
    assert oracle.extra(plan) == serve.CONFIGS["kvplug_cpu"].extra(plan)


def test_warm_up_prompts_one_per_context_in_first_use_order():
    kw = dict(n=20, n_contexts=5, n_docs=20, chunk_tokens=32, k_min=2, k_max=3, zipf_docs=1.0,
              zipf_contexts=1.0, seed=1, max_tokens=4)
    trace = serve.rag_session_trace(**kw)
    prompts = serve.warm_up_prompts(trace)
    order = list(dict.fromkeys(r.session for r in trace))
    assert len(prompts) == len(order)
    for p, session in zip(prompts, order):
        ctx = next(r.prompt.rsplit(SEPARATOR, 1)[0] for r in trace if r.session == session)
        assert p.startswith(ctx + SEPARATOR + "Question 0: ")
    assert not set(prompts) & {r.prompt for r in trace}  # the timed requests still compute their question


def test_share_of_oracle():
    rows = serve_report.with_oracle_share({"vllm": {"requests_per_s": 0.5}, "kvplug_cpu": {"requests_per_s": 1.5},
                                           "kvplug_oracle": {"requests_per_s": 2.0}})
    assert rows["vllm"]["share_of_oracle"] == pytest.approx(0.25)
    assert rows["kvplug_cpu"]["share_of_oracle"] == pytest.approx(0.75)
    assert rows["kvplug_oracle"]["share_of_oracle"] == 1.0
    alone = serve_report.with_oracle_share({"vllm": {"requests_per_s": 0.5}})  # no oracle row: NaN, no error
    assert math.isnan(alone["vllm"]["share_of_oracle"])


def test_vs_previous_ratios_and_workload_mismatch(tmp_path):
    w = {"name": "rag_sessions", "requests": 16, "contexts": 8, "seed": 0, "max_tokens": 16, "concurrency": 4}
    prev = {"timestamp": "t0", "kvplug": {"head": "abc"}, "workload": dict(w),
            "configs": {"vllm": {"requests_per_s": 0.4, "throughput_ratio_vs_vllm": 1.0},
                        "kvplug_blend": {"requests_per_s": 0.8, "throughput_ratio_vs_vllm": 2.0}}}
    now = {"vllm": {"requests_per_s": 0.5, "throughput_ratio_vs_vllm": 1.0},
           "kvplug_blend": {"requests_per_s": 0.9, "throughput_ratio_vs_vllm": 1.8},
           "kvplug_oracle": {"requests_per_s": 1.2, "throughput_ratio_vs_vllm": 2.4}}
    r = serve_report.vs_previous(now, w, prev, tmp_path / "p.json")
    assert list(r["configs"]) == ["vllm", "kvplug_blend"]  # only what both reports have
    b = r["configs"]["kvplug_blend"]
    assert b["requests_per_s_vs_previous"] == pytest.approx(0.9 / 0.8)
    assert b["vs_vllm_vs_previous"] == pytest.approx(0.9)
    assert r["workload_mismatch"] == [] and r["timestamp"] == "t0"
    assert serve_report.vs_previous(now, {**w, "requests": 64}, prev, tmp_path / "p.json")["workload_mismatch"] \
        == ["requests"]


def test_load_previous(tmp_path):
    assert serve_report.load_previous(None) is None
    assert serve_report.load_previous(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert serve_report.load_previous(tmp_path / "bad.json") is None
    (tmp_path / "ok.json").write_text('{"configs": {"vllm": {"requests_per_s": 1.0}}}')
    assert serve_report.load_previous(tmp_path / "ok.json")["configs"]["vllm"]["requests_per_s"] == 1.0


def test_previous_defaults(tmp_path):
    out = tmp_path / "serve.json"
    assert serve.parse_args(["--json", str(out)]).previous == serve.RESULTS / "serve_full.json"
    assert serve.parse_args(["--quick", "--json", str(out)]).previous == serve.RESULTS / "serve.json"
    out.write_text("{}")
    assert serve.parse_args(["--json", str(out)]).previous == out  # the file about to be replaced
    assert serve.parse_args(["--previous", ""]).previous is None


def test_neighbours_only_run_needs_no_vllm_reference():
    a = serve.parse_args(["--configs", "", "--policies", "", "--neighbours", "nb_before,nb_after"])
    assert serve.selected(a) == []
    with pytest.raises(SystemExit, match="nothing to run"):
        serve.selected(serve.parse_args(["--configs", "", "--policies", "", "--neighbours", ""]))
    with pytest.raises(SystemExit, match="unknown neighbours"):
        serve_neighbours.selected(serve.parse_args(["--neighbours", "nb_never"]))
    sizes = serve.parse_args(["--quick", "--nb-hits", "3", "--nb-docs", "2"]).nb_sizes
    assert (sizes.hits, sizes.docs, sizes.loads) == (3, 2, serve_neighbours.QUICK.loads)


# ---------------------------------------------------------------- neighbours case
def test_spread_keeps_order_and_spaces_neighbours():
    hits, nbs = [f"h{i}" for i in range(8)], ["n0", "n1"]
    out = serve_neighbours.spread(hits, nbs)
    assert [x for x in out if x.startswith("h")] == hits and [x for x in out if x.startswith("n")] == nbs
    assert [i for i, x in enumerate(out) if x.startswith("n")] == [2, 7]  # (2j + 1) * 10 // 4
    assert serve_neighbours.spread(hits, []) == hits
    assert serve_neighbours.spread([], nbs) == nbs
    out = serve_neighbours.spread(hits, [f"n{j}" for j in range(4)])
    gaps = [b - a for a, b in zip(*[[i for i, x in enumerate(out) if x.startswith("n")]] * 2)]
    assert all(g == 0 for g in gaps) and out[0].startswith("h") and out[-1].startswith("h")


def _phases(sizes=serve_neighbours.NbSizes(hit_contexts=3, hits=6, loads=4, new=2, docs=2, blends=1)):
    n = (sizes.hit_contexts + sizes.loads + sizes.new + sizes.blends) * sizes.docs
    docs = [f"document {i} " + "word " * 20 for i in range(n)]
    return sizes, docs, serve_neighbours.build_phases(sizes, docs, max_tokens=8, seed=0)


def test_neighbour_phases_requests_kinds_and_bodies():
    sizes, docs, ph = _phases()
    assert list(ph) == ["warm", "alone", "loads", "first_seen", "blends"]
    kinds = lambda reqs: [q.kind for q in reqs]  # noqa: E731
    # warm-up: the load contexts first (they must leave vLLM's own cache), then the hit contexts
    assert kinds(ph["warm"]) == ["disk", "remote", "disk", "remote", "blend", "hit", "hit", "hit"]
    assert all(q.request.max_tokens == 1 for q in ph["warm"])
    assert kinds(ph["alone"]) == ["hit"] * 6 and [q.context for q in ph["alone"]] == [0, 1, 2, 0, 1, 2]
    assert sorted(kinds(ph["loads"])) == ["disk", "disk"] + ["hit"] * 6 + ["remote", "remote"]
    assert sorted(kinds(ph["first_seen"])) == ["hit"] * 6 + ["new", "new"]
    assert sorted(kinds(ph["blends"])) == ["blend"] + ["hit"] * 6
    for q in (q for reqs in ph.values() for q in reqs):
        assert q.body == serve_neighbours.BODIES[q.kind]
    assert serve_neighbours.BODIES["hit"]["kv_transfer_params"] == {"blend": False}  # pure prefix hits
    assert serve_neighbours.BODIES["new"] == serve_neighbours.BODIES["blend"] == {}  # blended: the engine's default
    prompts = [q.request.prompt for reqs in ph.values() for q in reqs]
    assert len(set(prompts)) == len(prompts)


def test_neighbour_contexts_share_no_document():
    sizes, docs, ph = _phases()
    ctx = lambda reqs, kind: {q.request.prompt.rsplit(SEPARATOR, 1)[0] for q in reqs if q.kind == kind}  # noqa: E731
    warm_ctx = ctx(ph["warm"], "hit") | ctx(ph["warm"], "disk") | ctx(ph["warm"], "remote")
    assert ctx(ph["alone"], "hit") == ctx(ph["loads"], "hit") == ctx(ph["warm"], "hit")
    assert ctx(ph["loads"], "disk") | ctx(ph["loads"], "remote") == ctx(ph["warm"], "disk") | ctx(ph["warm"], "remote")
    new = ctx(ph["first_seen"], "new")
    assert len(new) == 2 and not new & warm_ctx
    blend_warm, blend_phase = ctx(ph["warm"], "blend"), ctx(ph["blends"], "blend")
    assert len(blend_warm) == len(blend_phase) == 1 and not blend_warm & blend_phase  # a new order
    (w,), (b,) = blend_warm, blend_phase
    lead, *warm_docs = w.split(SEPARATOR)
    assert lead == serve_neighbours.BLEND_LEAD and b.split(SEPARATOR) == [lead, *reversed(warm_docs)]
    used = [d for c in warm_ctx | new for d in c.split(SEPARATOR)] + warm_docs
    assert len(used) == len(set(used)) == len(docs)  # every document in exactly one context
    with pytest.raises(ValueError, match="documents needed"):
        serve_neighbours.contexts(sizes, docs[:-1])


def test_neighbour_configs_extra_config():
    from kvplug.config import KVPlugConfig

    plan = serve_neighbours.NbPlan(working_set_bytes=100 << 20, work_dir="/tmp/nbw", remote_url="redis://127.0.0.1:1/0")
    for name, async_loads in (("nb_sync", False), ("nb_after", True)):
        cfg = serve_neighbours.NB_CONFIGS[name]
        c = KVPlugConfig.from_dict(cfg.extra(plan))
        assert cfg.rev is None and c.tiers.async_loads is async_loads and c.blend.enabled
        assert c.namespaces["nb-disk"].cpu_bytes == 0 and c.namespaces["nb-remote"].disk_bytes == 0
        assert c.tiers.cpu_bytes >= 3 * plan.working_set_bytes and c.tiers.remote_url == plan.remote_url
    before = serve_neighbours.NB_CONFIGS["nb_before"]
    extra = before.extra(plan)
    assert before.rev == "before" and before.role == "before" and "async_loads" not in extra
    # the old revision's separate chunk budgets: this tree refuses them, the old one needs them
    assert extra["blend_cpu_bytes"] >= 1.5 * plan.working_set_bytes
    with pytest.raises(ValueError, match="blend_cpu_bytes"):
        KVPlugConfig.from_dict(extra)


def _timed_for(reqs, ttft_of):
    return [_timed(i, ttft_of(q), [ttft_of(q), ttft_of(q) + 0.1]) for i, q in enumerate(reqs)]


def test_phase_stats_separate_hits_and_neighbours():
    _, _, ph = _phases()
    reqs = ph["loads"]
    results = _timed_for(reqs, lambda q: 1.0 if q.kind == "hit" else 5.0)
    counters = {"kvplug": {"cpu_hit_tokens": 100.0, "disk_hit_tokens": 50.0, "remote_hit_tokens": 25.0},
                "prefix_cache": {"hits": 10.0, "queries": 40.0}}
    s = serve_neighbours.phase_stats(reqs, results, 5.0, counters)
    assert (s["hits"], s["neighbours"], s["requests"], s["errors"]) == (6, 4, 10, 0)
    assert s["hit_ttft_p50_s"] == s["hit_ttft_p90_s"] == 1.0 and s["neighbour_ttft_p50_s"] == 5.0
    assert s["kinds"] == {"hit": 6, "disk": 2, "remote": 2} and s["requests_per_s"] == pytest.approx(2.0)
    assert (s["disk_hit_tokens"], s["remote_hit_tokens"], s["vllm_prefix_hit_rate"]) == (50.0, 25.0, 0.25)
    assert [r["kind"] for r in s["per_request"]] == [q.kind for q in reqs]
    alone = serve_neighbours.phase_stats(ph["alone"], _timed_for(ph["alone"], lambda q: 1.0), 3.0, {})
    assert alone["neighbours"] == 0 and math.isnan(alone["neighbour_ttft_p50_s"])


def _nb_section(capsys=None):
    _, _, ph = _phases()
    slow = {"nb_before": 3.0, "nb_after": 1.5}

    def server(name, role):
        phases = {p: serve_neighbours.phase_stats(ph[p], _timed_for(ph[p], lambda q: 1.0 if p == "alone"
                                                                    else slow[name]), 4.0, {})
                  for p in serve_neighbours.PHASES}
        return {"role": role, "description": name, "kvplug_imported_from": "/k", "phases": phases}

    configs = {"nb_before": server("nb_before", "before"), "nb_after": server("nb_after", "after")}
    rows = serve_neighbours.table_rows(configs)
    side = serve_neighbours.side_by_side(rows, {n: c["role"] for n, c in configs.items()})
    return {"before": {}, "workload": {"requests_per_phase": {}, "concurrency": 4}, "failed_configs": [],
            "configs": configs, "table": rows, "side_by_side": side}


def test_neighbour_tables_ratios_vs_alone_and_after_vs_before(capsys):
    sec = _nb_section()
    row = next(r for r in sec["table"] if r["config"] == "nb_before" and r["phase"] == "loads")
    assert row["hit_p90_vs_alone"] == pytest.approx(3.0) and row["hits"] == 6
    assert next(r for r in sec["table"] if r["phase"] == "alone")["hit_p50_vs_alone"] == 1.0
    side = {(r["phase"], r["metric"]): r for r in sec["side_by_side"]}
    assert ("alone", "hit_p90_vs_alone") not in side  # 1 by definition
    assert side[("alone", "hit_ttft_p50_s")]["nb_after_vs_nb_before"] == pytest.approx(1.0)
    assert side[("loads", "hit_ttft_p90_s")]["nb_after_vs_nb_before"] == pytest.approx(0.5)
    assert side[("first_seen", "hit_p90_vs_alone")]["nb_before"] == pytest.approx(3.0)
    serve_neighbours.print_section(sec)
    out = capsys.readouterr().out
    assert "nb_after_vs_nb_before" in out and "first_seen" in out and "hit_ttft_p90_s" in out


def test_report_prints_oracle_share_previous_and_neighbours(capsys):
    def run(name, rps):
        res = [_timed(i, 1.0, [1.0, 1.1]) for i in range(int(rps * 2))]
        stats = {"config": name, "group": "main", "policy": None, **serve.aggregate(res, 2.0),
                 **serve.hit_rates({}, {}), **serve.blend_summary({})}
        return {"stats": stats, "extra_config": {}, "description": name, "server_start_s": 1.0,
                "omp_core_ids": "[0]", "load": {}, "counters": {}, "requests": []}

    plan = serve.Plan(working_set_bytes=1 << 20, evict_working_set_bytes=1 << 20, work_dir="/w")
    args = serve.parse_args(["--configs", "vllm,kvplug_oracle", "--policies", "", "--requests", "1"])
    args.model, args.kvplug_source = "m", {}
    runs = {"vllm": run("vllm", 1.0), "kvplug_oracle": run("kvplug_oracle", 2.0)}
    rep = serve.build_report(args, runs, {"requests": 1, "concurrency": 4}, plan, 1, [], 1.0, {},
                             {"neighbours": _nb_section()})
    assert rep["configs"]["vllm"]["share_of_oracle"] == pytest.approx(0.5)
    assert rep["argv"] == ["--configs", "vllm,kvplug_oracle", "--policies", "", "--requests", "1"]
    rep["previous"] = serve_report.vs_previous(rep["configs"], {}, {"configs": {"vllm": {"requests_per_s": 0.5}}},
                                               Path("prev.json"))
    assert rep["previous"]["configs"]["vllm"]["requests_per_s_vs_previous"] == pytest.approx(2.0)
    serve.print_report(rep)
    out = capsys.readouterr().out
    assert "share_of_oracle" in out and "vs previous results prev.json" in out and "neighbours:" in out


def test_prewarm_sends_each_context_once_before_the_trace(monkeypatch):
    sent = []
    monkeypatch.setattr(serve, "warm_pass", lambda url, model, prompts, conc, desc: sent.append(prompts) or
                        [_timed(i, 0.1, [0.1]) for i in range(len(prompts))])
    monkeypatch.setattr(serve.serving, "scrape_settled", lambda url, **kw: {})
    trace = serve.rag_session_trace(n=12, n_contexts=4, n_docs=12, chunk_tokens=16, k_min=2, k_max=3, zipf_docs=1.0,
                                    zipf_contexts=1.0, seed=2, max_tokens=4)
    args = serve.parse_args(["--concurrency", "4"])
    args.model = "m"
    out = serve.prewarm("http://x", args, trace)
    assert sent == [serve.warm_up_prompts(trace)]
    assert out["requests"] == len({r.session for r in trace}) and out["errors"] == 0
