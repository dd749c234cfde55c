"""Pure parts of benchmarks/serve.py and benchmarks/plots.py (no vLLM server): stats
aggregation, hit-rate math, ITL from chunk timestamps, the configuration registry, the
rag_sessions trace, and the plot functions on fake data."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve  # noqa: E402
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
    monkeypatch.setattr(serve, "CONFIGS", dict(serve.CONFIGS))
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
    # 8 servers: the main group without the remote tier, three eviction policies
    assert names == ["vllm", "kvplug_cpu", "kvplug_cpu_disk", "kvplug_blend", "kvplug_blend_adaptive",
                     "evict_lru", "evict_s3fifo", "evict_cost_aware"]
    assert (quick.requests, quick.evict_requests, quick.evict_cpu_frac) == (16, 16, 0.5)
    assert (quick.contexts, quick.max_tokens) == (8, 16)
    full = serve.parse_args([])
    names = [c.name for c in serve.selected(full)]
    assert names == ["vllm", "kvplug_cpu", "kvplug_cpu_disk", "kvplug_cpu_remote", "kvplug_blend",
                     "kvplug_blend_adaptive"] + [f"evict_{p}" for p in serve.POLICIES]
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
