"""SchedulerHalf over fake vLLM requests and scheduler outputs (no engine): what it claims, what
it plans to load and save, and when, including preemption and asynchronous loads."""
import pytest

from fakes import BS, SEP, Request, blend_prompt, doc, facts, step_cached, step_new
from kvplug.config import KVPlugConfig
from kvplug.connector.metadata import KVPlugWorkerMeta
from kvplug.connector.scheduler import SchedulerHalf


def half(tmp_path=None, **extra) -> SchedulerHalf:
    cfg = KVPlugConfig.from_dict({"cpu_bytes": 1e6, **extra})
    return SchedulerHalf(cfg, facts(), separator=SEP)


def run_prefill(s: SchedulerHalf, req: Request, blocks: list[int]):
    """vLLM's view of a request prefilled in one step: lookup, alloc, one scheduled step."""
    n, _ = s.num_matched(req, 0)
    s.after_alloc(req, blocks, n)
    s.build_meta(step_new(req, blocks, 0, len(req.prompt_token_ids) - n))  # the loads and the blend
    return s.build_meta(step_cached(req, len(req.prompt_token_ids), 1))  # saves of what it computed


def test_prefix_blocks_are_saved_then_found_and_loaded_from_the_cpu_tier():
    s = half()
    a = Request("a", list(range(1, 70)))
    n, is_async = s.num_matched(a, 0)
    assert (n, is_async) == (0, False)
    s.after_alloc(a, [1, 2, 3, 4, 5], 0)
    meta = s.build_meta(step_new(a, [1, 2, 3, 4, 5], 0, 69))
    assert [x.block for x in meta.saves] == [1, 2, 3, 4]  # the 4 full blocks
    b = Request("b", list(range(1, 70)))
    n, is_async = s.num_matched(b, 0)
    assert (n, is_async) == (4 * BS, False)
    s.after_alloc(b, [9, 10, 11, 12, 13], n)
    meta = s.build_meta(step_new(b, [9, 10, 11, 12, 13], n, 69 - n))
    assert [(x.block, x.tier) for x in meta.loads] == [(9, "cpu"), (10, "cpu"), (11, "cpu"), (12, "cpu")]
    assert meta.loads[0].rows == next(x.rows for x in s_saves(s, a))  # from the row it was saved to


def s_saves(s, req):  # rows of the saves planned for req so far, from the manager
    return [type("S", (), {"rows": s.manager._slots[k]})() for k in s._reqs[req.request_id].keys[:1]]


def test_prefix_tier_blocks_come_first_and_a_missed_chunk_there_ends_the_claim():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(3))), list(range(1, 10)))
    b = Request("b", blend_prompt(doc(1), doc(2), doc(3)))
    # Same root (same ratio and policy): w's blocks [0, 64) match (positions 62-63 are the
    # separator in both); d2 ([62, 104)) starts inside them and misses: nothing to blend.
    assert s.num_matched(b, 0) == (64, False)
    s.after_alloc(b, list(range(20, 30)), 64)
    assert s.build_meta(step_new(b, list(range(20, 30)), 64, 90)).blends == []


def test_lookups_have_no_side_effects_and_may_be_repeated():
    s = half(blend=True)
    first = Request("a", blend_prompt(doc(1), doc(2)))
    run_prefill(s, first, list(range(1, 10)))
    again = Request("b", blend_prompt(doc(2), doc(1)))
    assert s.num_matched(again, 0) == s.num_matched(again, 0)
    assert s.manager.counters.take().get("cpu_hits", 0) == 0


def test_first_seen_chunks_are_computed_by_vllm_and_saved_once_computed():
    s = half(blend=True)
    a = Request("a", blend_prompt(doc(1), doc(2)))
    n, _ = s.num_matched(a, 0)
    assert n == 0  # no chunk cached: nothing to claim
    s.after_alloc(a, list(range(1, 10)), 0)
    half_way = s.build_meta(step_new(a, list(range(1, 10)), 0, 50))  # chunked prefill: 50 tokens
    assert [(c.begin, c.end) for c in half_way.chunk_saves] == [(0, 20)]  # only the head is complete
    rest = s.build_meta(step_cached(a, 50, len(a.prompt_token_ids) - 50))
    assert [(c.begin, c.end) for c in rest.chunk_saves] == [(20, 62), (62, 104)]
    assert all(c.rows and c.nbytes == facts().chunk_bytes(c.end - c.begin) for c in rest.chunk_saves)
    assert s.build_meta(step_cached(a, len(a.prompt_token_ids), 1)).chunk_saves == []  # never twice


def test_cached_chunks_are_claimed_up_to_the_first_miss_and_blended_ones_never_saved():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(3))), list(range(1, 10)))  # head, d1, d3 cached
    s.take_stats()
    # d2 is new; another ratio, so the prefix tiers hold none of its blocks (their root differs)
    b = Request("b", blend_prompt(doc(1), doc(2), doc(3)), kv_transfer_params={"recompute_ratio": 0.2})
    n, is_async = s.num_matched(b, 0)
    assert (n, is_async) == (62, False)  # head and d1; d2 misses, so d3 (cached) is left to vLLM
    blocks = list(range(20, 30))
    s.after_alloc(b, blocks, n)
    meta = s.build_meta(step_new(b, blocks, n, len(b.prompt_token_ids) - n))
    (plan,) = meta.blends
    assert (plan.start, plan.end) == (0, 62) and [c.tier for c in plan.chunks] == ["cpu", "cpu"]
    # the relevance pass runs the question (after d3), not d2 and d3 that vLLM computes
    assert plan.tail_at == 146 and plan.tail == b.prompt_token_ids[146:] and plan.block_ids == blocks
    assert [(c.begin, c.end) for c in meta.chunk_saves] == [(62, 104)]  # d2 only: d3 is cached already
    stats = s.take_stats().data
    assert stats["blend_chunk_hits"] == 2 and stats["blend_chunk_misses"] == 1
    assert stats["blend_chunks_after_miss"] == 1 and stats["blend_tokens_after_miss"] == 42


def test_the_claim_starts_after_vllms_own_prefix_hit_and_loads_a_straddling_chunk():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(2))), list(range(1, 10)))
    b = Request("b", blend_prompt(doc(1), doc(2)), kv_transfer_params={"recompute_ratio": 0.5})
    n, _ = s.num_matched(b, 2 * BS)  # vLLM holds [0, 32): inside d1 ([20, 62))
    assert n == 104 - 2 * BS
    s.after_alloc(b, list(range(1, 10)), n)
    (plan,) = s.build_meta(step_new(b, list(range(1, 10)), 2 * BS, 104 - 2 * BS + 1)).blends
    assert plan.start == 2 * BS and [(c.begin, c.tier) for c in plan.chunks if c.tier] == [(20, "cpu"), (62, "cpu")]
    assert plan.ratio == 0.5


def test_disk_hits_load_asynchronously_and_hold_the_blocks_until_they_land(tmp_path):
    disk = str(tmp_path / "d")
    s = half(disk_path=disk, cpu_bytes=0)
    a = Request("a", list(range(1, 70)))
    run_prefill(s, a, [1, 2, 3, 4, 5])
    for name in ("a", "b"):
        for k in s._reqs.get(name, s._reqs["a"]).keys[:4]:  # what the worker would have written
            path = __import__("kvplug.tiers.disk", fromlist=["unit_path"]).unit_path(tmp_path / "d", k, 0)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 100)
    b = Request("b", list(range(1, 70)))
    n, is_async = s.num_matched(b, 0)
    assert (n, is_async) == (4 * BS, True)
    s.after_alloc(b, [9, 10, 11, 12, 13], n)
    meta = s.build_meta(step_new(b, [9, 10, 11, 12, 13], n, 0))
    assert meta.async_reqs == ["b"] and all(x.tier == "disk" and x.rows == () for x in meta.loads)
    assert s.finished(b) is True  # aborted while loading: vLLM must keep its blocks
    s.loads_landed({"b"})
    assert s.finished(b) is False


def test_async_loads_off_loads_disk_hits_in_the_step(tmp_path):
    s = half(disk_path=str(tmp_path / "d"), cpu_bytes=0, async_loads=False)
    a = Request("a", list(range(1, 70)))
    run_prefill(s, a, [1, 2, 3, 4, 5])
    for k in s._reqs["a"].keys[:4]:
        path = __import__("kvplug.tiers.disk", fromlist=["unit_path"]).unit_path(tmp_path / "d", k, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    assert s.num_matched(Request("b", list(range(1, 70))), 0) == (4 * BS, False)


def test_preempted_request_resumes_with_a_fresh_plan_and_no_duplicate_saves():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(2))), list(range(1, 10)))
    b = Request("b", blend_prompt(doc(2), doc(1)))
    n, _ = s.num_matched(b, 0)
    s.after_alloc(b, list(range(20, 27)), n)
    first = s.build_meta(step_new(b, list(range(20, 27)), 0, 1))
    assert len(first.blends) == 1
    # Preempted before the rest ran: vLLM frees the blocks, later resumes it with new ones.
    n2, _ = s.num_matched(b, 0)
    assert n2 == n
    s.after_alloc(b, list(range(40, 47)), n2)
    resumed = s.build_meta(step_cached(b, 0, len(b.prompt_token_ids), new_blocks=list(range(40, 47)), resumed=True))
    (plan,) = resumed.blends
    assert plan.block_ids == list(range(40, 47))  # the new blocks, not the freed ones
    assert resumed.chunk_saves == []  # blended chunks are cached already: never saved from blended KV
    assert all(x.block in range(40, 47) for x in resumed.saves)


def test_blending_turned_off_by_the_worker_stops_claims():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(2))), list(range(1, 10)))
    b = Request("b", blend_prompt(doc(2), doc(1)))
    assert s.num_matched(b, 0)[0] > 0
    s.on_worker_meta(KVPlugWorkerMeta([], "self-test failed"))
    assert s.num_matched(Request("c", blend_prompt(doc(2), doc(1))), 0)[0] == 0


def test_failed_chunk_load_is_forgotten_and_saved_again_once_vllm_recomputes_it():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(2))), list(range(1, 10)))
    b = Request("b", blend_prompt(doc(2), doc(1)))
    n, _ = s.num_matched(b, 0)
    s.after_alloc(b, list(range(20, 27)), n)
    (plan,) = s.build_meta(step_new(b, list(range(20, 27)), 0, 1)).blends
    bad = plan.chunks[1].key
    s.on_worker_meta(KVPlugWorkerMeta([("b", bad)]))
    assert s.manager.lookup_each([bad]) == [None]
    resaved = s.build_meta(step_cached(b, len(b.prompt_token_ids), 1))
    assert [c.key for c in resaved.chunk_saves] == [bad]


@pytest.mark.parametrize("params", [{"blend": False}, {"recompute_ratio": 3}])
def test_opted_out_or_bad_params_are_not_blended(params):
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(2))), list(range(1, 10)))
    assert s.num_matched(Request("b", blend_prompt(doc(2), doc(1)), kv_transfer_params=params), 0)[0] == 0


def test_a_request_that_says_save_false_loads_but_saves_nothing():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(2))), list(range(1, 10)))
    b = Request("b", blend_prompt(doc(2), doc(1), doc(3)), kv_transfer_params={"save": False})
    n, _ = s.num_matched(b, 0)
    assert n > 0  # it still blends what is cached
    s.after_alloc(b, list(range(20, 30)), n)
    first = s.build_meta(step_new(b, list(range(20, 30)), 0, len(b.prompt_token_ids)))
    later = s.build_meta(step_cached(b, len(b.prompt_token_ids), 1))
    assert first.blends and not (first.saves or first.chunk_saves or later.saves or later.chunk_saves)
    c = Request("c", blend_prompt(doc(3)), kv_transfer_params={"save": "no"})  # bad value: saves as usual
    run_prefill(s, c, list(range(40, 50)))
    assert s.manager.lookup_each([s._reqs["c"].blend.chunks[1][2]]) == ["cpu"]


# ---- the cost gate ----------------------------------------------------------------------------
def measured(s, prefill_per_token, blend_per_job, blend_per_span_token, blend_per_recomputed):
    """Worker timings as the scheduler receives them: forward passes of a few sizes at a fixed
    cost per token, and blend batches costing what the arguments say."""
    forward = [(0.002 + prefill_per_token * t, t, t * t / 2) for t in (8, 500, 40, 1200, 16, 900)]
    blends = [(blend_per_job * j + blend_per_span_token * span + blend_per_recomputed * rec, j, span, rec, rec * span / 2)
              for j, span, rec in ((1, 300, 45), (2, 900, 200), (1, 120, 20), (3, 1500, 260))]
    s.on_worker_meta(KVPlugWorkerMeta(forward=forward, blends=blends))


def test_the_cost_gate_claims_a_run_its_measurements_say_is_faster_and_declines_a_slower_one():
    from kvplug.connector.scheduler import _explores

    assert not _explores("b")  # "b" is not one of the requests that blend to explore
    runs = {}
    for name, per_job in (("fast", 0.001), ("slow", 5.0)):  # a blend job costs 1 ms, or 5 s
        s = half(blend=True)
        run_prefill(s, Request("w", blend_prompt(doc(1), doc(3))), list(range(1, 10)))
        measured(s, prefill_per_token=0.01, blend_per_job=per_job, blend_per_span_token=1e-5,
                 blend_per_recomputed=0.006)
        s.take_stats()
        b = Request("b", blend_prompt(doc(1), doc(3)), kv_transfer_params={"recompute_ratio": 0.2})
        n, _ = s.num_matched(b, 0)
        s.after_alloc(b, list(range(20, 30)), n)
        runs[name] = (n, s.take_stats().data)
    assert runs["fast"][0] == 104 and runs["fast"][1]["blend_chunk_hits"] == 3  # head, d1, d3
    assert runs["slow"][0] == 0 and "blend_chunk_hits" not in runs["slow"][1]
    assert runs["slow"][1]["blend_declined_tokens"] == 104  # every cached token, left to vLLM


def test_without_measurements_the_gate_claims_as_before():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(3))), list(range(1, 10)))
    assert not s.gate.ready
    b = Request("b", blend_prompt(doc(1), doc(2), doc(3)), kv_transfer_params={"recompute_ratio": 0.2})
    assert s.num_matched(b, 0) == (62, False)  # up to the first miss


def test_cached_chunks_after_a_missed_one_are_blended_where_the_gate_says_it_pays():
    s = half(blend=True)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(3))), list(range(1, 10)))  # head, d1, d3 cached
    measured(s, prefill_per_token=0.01, blend_per_job=0.001, blend_per_span_token=1e-5, blend_per_recomputed=0.006)
    s.take_stats()
    b = Request("b", blend_prompt(doc(1), doc(2), doc(3)), kv_transfer_params={"recompute_ratio": 0.2})
    n, _ = s.num_matched(b, 0)
    assert n == 146  # through d3: d2 (no tier holds it) is recomputed inside the blend
    blocks = list(range(20, 30))
    s.after_alloc(b, blocks, n)
    meta = s.build_meta(step_new(b, blocks, n, len(b.prompt_token_ids) - n))
    (plan,) = meta.blends
    assert [(c.begin, c.end, c.tier) for c in plan.chunks] == [(0, 20, "cpu"), (20, 62, "cpu"), (62, 104, None),
                                                               (104, 146, "cpu")]
    assert plan.chunks[2].key is not None  # d2 keeps its key: saved once the blend computed it
    assert [(c.begin, c.end) for c in meta.chunk_saves] == [(62, 104)]
    stats = s.take_stats().data
    assert stats["blend_chunks_after_miss_blended"] == 1 and stats["blend_tokens_after_miss_blended"] == 42
    assert "blend_chunks_after_miss" not in stats and stats["blend_chunk_misses"] == 1


def test_an_asynchronous_blend_starts_when_every_rank_has_fetched_its_chunks():
    import dataclasses

    s = SchedulerHalf(KVPlugConfig.from_dict({"cpu_bytes": 1e6, "blend": True}),
                      dataclasses.replace(facts(), tp_size=2), separator=SEP)
    s.on_worker_meta(KVPlugWorkerMeta(fetched={"b": 1}))  # one rank of two
    assert s.build_meta(step_cached(Request("x", [1]), 1, 1)).blend_now == []
    s.on_worker_meta(KVPlugWorkerMeta(fetched={"b": 1}))  # the other
    assert s.build_meta(step_cached(Request("x", [1]), 1, 1)).blend_now == ["b"]
    assert s.build_meta(step_cached(Request("x", [1]), 1, 1)).blend_now == []  # once


def test_worker_timings_of_tensor_parallel_ranks_aggregate_to_the_slowest():
    a = KVPlugWorkerMeta(fetched={"b": 1}, forward=[(0.5, 100, 5e3)], blends=[(0.2, 1, 50, 10, 250.0)])
    b = KVPlugWorkerMeta(fetched={"b": 1, "c": 1}, forward=[(0.7, 100, 5e3)], blends=[(0.1, 1, 50, 10, 250.0)])
    m = a.aggregate(b)
    assert m.fetched == {"b": 2, "c": 1} and m.forward == [(0.7, 100, 5e3)] and m.blends == [(0.2, 1, 50, 10, 250.0)]


def test_with_the_gate_off_every_cached_chunk_is_claimed_past_a_missed_one():
    s = half(blend=True, blend_cost_gate=False)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(3))), list(range(1, 10)))
    measured(s, prefill_per_token=0.01, blend_per_job=5.0, blend_per_span_token=1e-5, blend_per_recomputed=0.006)
    b = Request("b", blend_prompt(doc(1), doc(2), doc(3)), kv_transfer_params={"recompute_ratio": 0.2})
    assert s.num_matched(b, 0) == (146, False)  # slow blends measured, but nothing is gated


# ---- the quality guard -------------------------------------------------------------------------
def test_audited_kls_raise_the_recompute_ratio_of_new_requests_and_report_the_floor():
    s = half(blend=True, blend_max_kl=0.05, blend_audit_rate=1.0)
    run_prefill(s, Request("w", blend_prompt(doc(1), doc(3))), list(range(1, 10)))
    s.take_stats()
    s.on_worker_meta(KVPlugWorkerMeta(audits=[0.4, 0.6, 0.5]))  # a window of badly wrong blends
    assert s.take_stats().data["blend_guard_ratio"] == 0.15
    b = Request("b", blend_prompt(doc(3), doc(1)), kv_transfer_params={"recompute_ratio": 0.05})
    n, _ = s.num_matched(b, 0)
    s.after_alloc(b, list(range(20, 30)), n)
    (plan,) = s.build_meta(step_new(b, list(range(20, 30)), n, len(b.prompt_token_ids) - n)).blends
    assert plan.ratio == 0.15 and plan.audit and plan.tenant == ""  # the floor beats the request's 0.05


def test_a_fixed_share_of_requests_is_audited_and_tenants_are_bounded_labels():
    from kvplug.connector.scheduler import _samples

    ids = [f"req-{i}" for i in range(4000)]
    share = sum(_samples(r, 0.01) for r in ids) / len(ids)
    assert 0.005 < share < 0.015 and all(_samples(r, 1.0) for r in ids[:50]) and not any(_samples(r, 0.0) for r in ids)
    s = half(blend=True, namespaces={"team-a": {"cpu_bytes": 1e5}})
    assert (s._tenant("team-a"), s._tenant(""), s._tenant("some-user-1234")) == ("team-a", "", "other")


def test_blend_async_sends_even_a_cpu_tier_blend_through_the_asynchronous_path():
    for blend_async in (False, True):
        s = half(blend=True, blend_async=blend_async)
        run_prefill(s, Request("w", blend_prompt(doc(1), doc(3))), list(range(1, 10)))
        b = Request("b", blend_prompt(doc(3), doc(1)), kv_transfer_params={"recompute_ratio": 0.2})
        n, is_async = s.num_matched(b, 0)
        assert n == 104 and is_async is blend_async
        s.after_alloc(b, list(range(20, 30)), n)
        meta = s.build_meta(step_new(b, list(range(20, 30)), n, 0 if blend_async else len(b.prompt_token_ids) - n))
        assert (meta.async_reqs == ["b"]) is blend_async and len(meta.blends) == 1
        s.on_worker_meta(KVPlugWorkerMeta(fetched={"b": 1}))
        assert s.build_meta(step_cached(Request("x", [1]), 1, 1)).blend_now == ["b"]


def test_a_steps_attention_pairs_count_every_scheduled_request_against_its_context():
    s = half(blend=True)
    a, b = Request("a", list(range(1, 200))), Request("b", list(range(1, 90)))
    so = step_new(a, [1, 2], 100, 50)
    so.scheduled_cached_reqs = step_cached(b, 80, 1).scheduled_cached_reqs
    so.num_scheduled_tokens["b"] = 1
    meta = s.build_meta(so)
    assert meta.step_pairs == 50 * (100 + 25) + 1 * (80 + 0.5)
