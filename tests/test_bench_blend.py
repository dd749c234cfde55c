"""Blend benchmark (benchmarks/blend.py, blend_report.py, blend_metrics.py) and its synthetic
multi-document QA set: pure Python, no engine."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import blend  # noqa: E402
import blend_engine  # noqa: E402
import blend_metrics as bm  # noqa: E402
import blend_report as br  # noqa: E402
from benchmarks.workloads import SEPARATOR, multidoc_qa as mq  # noqa: E402


@pytest.fixture(scope="module")
def qs():
    return mq.build(n_questions=40, pool=24, docs_per_prompt=6, passage_tokens=128, seed=0)


def test_same_seed_same_set_other_seed_differs(qs):
    again = mq.build(n_questions=40, pool=24, docs_per_prompt=6, passage_tokens=128, seed=0)
    other = mq.build(n_questions=40, pool=24, docs_per_prompt=6, passage_tokens=128, seed=1)
    assert again == qs
    assert [qs.prompt(i) for i in qs.items] == [again.prompt(i) for i in again.items]
    assert other.passages != qs.passages and other.items != qs.items


def test_sizes(qs):
    assert len(qs.passages) == len(qs.facts) == 24
    assert len(qs.items) == 40
    assert all(len(it.doc_ids) == 6 == len(set(it.doc_ids)) for it in qs.items)
    assert all(0 <= d < 24 for it in qs.items for d in it.doc_ids)
    # ~128 tokens approximated as 0.75 words per token, fact included
    assert all(80 <= len(p.split()) <= 110 for p in qs.passages)
    small = mq.build(n_questions=3, pool=8, docs_per_prompt=4, passage_tokens=64, seed=0)
    assert len(small.passages) == 8 and len(small.items) == 3
    assert all(len(it.doc_ids) == 4 for it in small.items)


def test_tokenizer_sizes_passages():
    count = lambda s: s.split()  # noqa: E731  one token per word
    s = mq.build(n_questions=2, pool=6, docs_per_prompt=3, passage_tokens=100, seed=0, tokenizer=count)
    assert all(90 <= len(p.split()) <= 100 for p in s.passages)


def test_prompt_has_passages_then_question(qs):
    for it in qs.items:
        parts = qs.prompt(it).split(SEPARATOR)
        assert len(parts) == 1 + 6 + 1  # head, 6 passages, question
        assert parts[0] == qs.system
        assert parts[1:7] == [qs.passages[d] for d in it.doc_ids]
        assert parts[7].startswith(f"Question: {it.question}")
        assert parts[7].endswith(it.answer_prefix) and it.answer_prefix
        assert "".join(qs.chunks(it)) == qs.prompt(it)
        assert "#" not in qs.system


def test_gold_fact_in_exactly_one_prompt_passage(qs):
    for it in qs.items:
        assert it.target in it.doc_ids
        fact = qs.facts[it.target]
        assert it.answer == fact.value and it.question == fact.question
        holders = [d for d in it.doc_ids if fact.sentence in qs.passages[d]]
        assert holders == [it.target]
        assert it.answer not in qs.prompt(it).split(SEPARATOR)[-1]  # the question does not leak it


def test_facts_unique_and_inserted_at_sentence_boundary(qs):
    assert len({f.subject.split()[1] for f in qs.facts}) == 24  # one name per fact
    assert len({f.value for f in qs.facts}) == 24
    for p, f in zip(qs.passages, qs.facts):
        assert p.count(f.sentence) == 1
        before = p.split(f.sentence)[0].rstrip()
        assert before == "" or before[-1] in ".!?\"')]"


def test_passages_reused_across_questions_in_different_orders(qs):
    positions: dict[int, set[int]] = {}
    for it in qs.items:
        for pos, d in enumerate(it.doc_ids):
            positions.setdefault(d, set()).add(pos)
    used = [d for d in positions if sum(d in it.doc_ids for it in qs.items) > 1]
    assert len(used) >= 20
    assert sum(len(positions[d]) > 1 for d in used) >= 20  # same passage, other positions
    # every passage is asked about once before any twice
    assert sorted(it.target for it in qs.items[:24]) == list(range(24))
    assert len({it.doc_ids for it in qs.items}) == len(qs.items)


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        mq.build(n_questions=2, pool=4, docs_per_prompt=6)
    with pytest.raises(ValueError):
        mq.build(n_questions=2, pool=40, docs_per_prompt=6)  # more facts than names


def test_chat_frame_wraps_the_chunks():
    class Tok:
        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in msgs) + "<assistant>"

    s = mq.build(n_questions=2, pool=8, docs_per_prompt=3, passage_tokens=64, seed=0, frame=mq.chat_frame(Tok()))
    it = s.items[0]
    p = s.prompt(it)
    assert p.startswith(f"<system>{s.system}</system><user>Documents:{SEPARATOR}")
    assert p.endswith(f"Question: {it.question}</user><assistant>{it.answer_prefix}")
    assert len(p.split(SEPARATOR)) == 5


def test_answer_correct():
    assert mq.answer_correct(" 73914.", "73914")
    assert mq.answer_correct("The code is 73,914", "73914")
    assert not mq.answer_correct(" 7391", "73914")
    assert not mq.answer_correct("no idea", "73914")


def test_passage_chunk_prompt_is_one_passage(qs):
    parts = qs.passage_chunk_prompt(3).split(SEPARATOR)
    assert len(parts) == 3 and parts[1] == qs.passages[3]


# ---------------------------------------------------------------- metric helpers
def test_kl_identical_is_zero():
    lp = {1: -0.1, 2: -2.5, 3: -4.0, 4: -7.0}
    assert bm.kl_first_token(lp, dict(lp)) == pytest.approx(0.0, abs=1e-12)


def _normalised(logits: dict) -> dict:
    z = math.log(sum(math.exp(v) for v in logits.values()))
    return {t: v - z for t, v in logits.items()}


def test_kl_equals_the_exact_kl_when_the_top_k_holds_the_whole_vocabulary():
    p = _normalised({1: 2.0, 2: 0.5, 3: -1.0, 4: -3.0})
    q = _normalised({1: 0.3, 2: 1.5, 3: -0.5, 4: -2.0})
    exact = sum(math.exp(p[t]) * (p[t] - q[t]) for t in p)
    assert bm.kl_first_token(p, q, k=4) == pytest.approx(exact, rel=1e-9)


def test_kl_tail_bucket_is_the_kl_of_the_coarse_grained_distributions():
    p = _normalised({i: -0.3 * i for i in range(30)})
    q = _normalised({i: -0.3 * i + (0.8 if i == 0 else 0.0) for i in range(30)})
    top = sorted(p, key=p.get, reverse=True)[:5]
    pt = [math.exp(p[t]) for t in top] + [1 - sum(math.exp(p[t]) for t in top)]
    qt = [math.exp(q[t]) for t in top] + [1 - sum(math.exp(q[t]) for t in top)]
    coarse = sum(a * math.log(a / b) for a, b in zip(pt, qt))
    full = sum(math.exp(p[t]) * (p[t] - q[t]) for t in p)
    got = bm.kl_first_token(p, q, k=5)
    assert got == pytest.approx(coarse, rel=1e-9)
    assert 0 < got <= full  # coarse-graining never increases the KL


def test_kl_with_a_reference_token_missing_from_q_is_finite_and_positive():
    ref = _normalised({1: 1.0, 2: 0.0, 3: -1.0})
    q = {1: math.log(0.5), 9: math.log(0.3)}  # token 2, 3 not returned: they get q's smallest logprob
    kl = bm.kl_first_token(ref, q, k=3)
    assert kl > 0 and math.isfinite(kl)


def test_kl_ignores_changes_inside_the_tail():
    ref = _normalised({i: -float(i) for i in range(25)})
    q = dict(ref)
    q[23], q[24] = ref[24], ref[23]  # mass moves between two tokens outside the reference's top 20
    assert bm.kl_first_token(ref, q, k=20) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bm.kl_first_token({}, q))


def test_mean_loglik_and_bootstrap_interval_of_a_mean():
    assert bm.mean_loglik([-1.0, -2.0, -3.0]) == -2.0 and math.isnan(bm.mean_loglik([]))
    x = [0.1 * i for i in range(50)]
    lo, hi = bm.bootstrap_mean_ci(x)
    assert lo < sum(x) / len(x) < hi and hi - lo < 1.0
    assert bm.bootstrap_mean_ci(x) == bm.bootstrap_mean_ci(x)  # seeded
    assert bm.bootstrap_mean_ci([1.0, math.nan, 1.0]) == (1.0, 1.0)  # nan entries dropped
    assert all(math.isnan(v) for v in bm.bootstrap_mean_ci([]))


def test_top1_and_agreement_counting():
    assert bm.top1({"5": -0.2, "7": -1.0}) == "5"
    assert bm.top1_agree({"5": -0.2, "7": -1.0}, {"5": -0.9, "7": -1.0})
    assert not bm.top1_agree({"5": -0.2, "7": -1.0}, {"5": -1.9, "7": -1.0})
    assert bm.agreement(["a", "b", "c"], ["a", "x", "c"]) == (2, 3)
    assert bm.value_agreement([" 12.", " 12.\n\nThe", " 13", "none"], [" 12.", " 12.", " 12", "x"]) == (3, 4)
    with pytest.raises(ValueError):
        bm.agreement(["a"], ["a", "b"])


def test_wilson_interval_matches_a_hand_computed_case_and_stays_in_range():
    lo, hi = bm.wilson_ci(8, 10)  # p = 0.8, n = 10: (0.490, 0.943) by the formula
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert bm.wilson_ci(0, 5)[0] == 0.0 and bm.wilson_ci(5, 5)[1] == 1.0
    assert all(math.isnan(x) for x in bm.wilson_ci(0, 0))


def test_paired_bootstrap_interval_covers_the_paired_difference():
    a, b = [1] * 30 + [0] * 10, [1] * 20 + [0] * 20  # a wins on 10 questions, never loses
    lo, hi = bm.paired_bootstrap_ci(a, b)
    assert 0 < lo <= 0.25 <= hi < 0.5
    assert bm.paired_bootstrap_ci(a, a) == (0.0, 0.0)


def test_smallest_reaching():
    pts = [(0.0, 0.5), (0.05, 0.58), (0.15, 0.66), (1.0, 0.7)]
    assert bm.smallest_reaching(pts, 0.66) == 0.15
    assert bm.smallest_reaching(pts, 0.71) is None


# ---------------------------------------------------------------- configurations and report
def test_default_policy_and_rivals_at_every_ratio_plus_the_shared_endpoints():
    names = blend.config_names(quick=False)
    assert names[:2] == ["concat", "ratio_1"] and len(names) == 2 + len(blend.POLICIES) * len(blend.RATIOS)
    assert blend.default_config() in names  # the default policy at its default ratio is always measured
    assert {"mixed_0.1", "adaptive_0.3", "query_0.15"} <= set(names)
    assert blend.config_names(False, ["fixed"], [0.05]) == ["concat", "ratio_1", "fixed_0.05"]
    assert br.kv_params("concat") == {"recompute_ratio": 0.0, "recompute_policy": "query"}
    assert br.kv_params("fixed_0.15") == {"recompute_ratio": 0.15, "recompute_policy": "fixed"}
    from kvplug.config import RECOMPUTE_POLICIES

    assert set(blend.POLICIES) <= set(RECOMPUTE_POLICIES)
    assert all(br.kv_params(c)["recompute_policy"] in RECOMPUTE_POLICIES for c in blend.QUICK_CONFIGS)
    assert blend.default_config() in blend.QUICK_CONFIGS


def test_policies_and_ratios_on_the_command_line_are_checked():
    a = blend.parse_args(["--policies", "query,fixed", "--ratios", "0.05,0.2"])
    assert a.policies == ["query", "fixed"] and a.ratios == [0.05, 0.2] and a.per_family == 256
    assert blend.parse_args(["--quick"]).per_family == 8
    with pytest.raises(SystemExit):
        blend.parse_args(["--policies", "query,nosuch"])
    with pytest.raises(SystemExit):
        blend.parse_args(["--ratios", "1.5"])


def test_requests_carry_the_answer_to_force(qs):
    reqs = blend.requests("synthetic", qs)
    assert [r["answer"] for r in reqs] == [" " + it.answer for it in qs.items]  # after "... is"
    assert all(r["prompt"] == qs.prompt(it) for r, it in zip(reqs, qs.items))


def _req(it, text, lp, ttft, loglik=None, counters=None, fam="synthetic"):
    return {"id": f"{fam}/{it.qid}", "text": text, "first_token_logprobs": lp, "ttft_s": ttft,
            "prompt_tokens": 100, "counters": counters or {},
            "answer_logprobs": None if loglik is None else [loglik, loglik], "forced_from": "fresh"}


def test_summarize_accuracy_agreement_kl_loglik_recomputed_and_ttft_ratio(qs):
    items = qs.items[:2]
    ref = [_req(items[0], f" {items[0].answer}.", {"1": -0.1, "2": -3.0}, 2.0, -0.5),
           _req(items[1], f" {items[1].answer}.", {"2": -0.1, "1": -3.0}, 2.0, -1.0)]
    c = {"kvplug_blend_requests": 1, "kvplug_blend_tokens": 190, "kvplug_blend_recomputed_tokens": 30}
    run = [_req(items[0], f" {items[0].answer}. The", {"1": -0.1, "2": -3.0}, 0.5, -0.5, c),
           _req(items[1], " 3.", {"1": -0.2, "2": -2.0}, 1.5, -2.0, c)]
    s = br.summarize("fixed_0.15", run, ref, qs, 2.0)
    assert s["accuracy"] == 0.5 and s["value_agree"] == 0.5 and s["text_agree"] == 0.0 and s["top1_agree"] == 0.5
    assert s["recomputed_frac_of_blend_tokens"] == pytest.approx(60 / 380)
    assert s["ttft_p50_s"] == 1.0 and s["ttft_ratio_vs_full"] == 0.5
    assert s["kl"][0] == pytest.approx(0.0, abs=1e-12) and s["kl"][1] > 0 and s["kl_mean"] == s["kl"][1] / 2
    assert s["loglik"] == [-0.5, -2.0] and s["loglik_gap_mean"] == pytest.approx(0.5)  # ref minus config
    assert s["loglik_gap_ci95"][0] <= 0.5 <= s["loglik_gap_ci95"][1]
    assert (s["policy"], s["ratio"]) == ("fixed", 0.15) and s["correct"] == [1, 0]
    assert s["acc_vs_full_ci95"][0] <= -0.5 <= s["acc_vs_full_ci95"][1]
    lo, hi = s["accuracy_ci95"]
    assert lo < 0.5 < hi


def _phases(qs, n=4):
    """Engine results as blend_engine writes them: the reference answers everything right, concat
    nothing, the default half; TTFTs 2.0 / 0.2 / 0.6 / 2.4 s."""
    items = qs.items[:n]
    good = {"1": -0.05, "2": -3.2}
    bad = {"2": -0.3, "1": -1.5}

    def phase(name, right, lp, ttft, loglik):
        reqs = [_req(it, f" {it.answer}." if right(i) else " 1.", lp if not right(i) else good, ttft, loglik)
                for i, it in enumerate(items)]
        return {"name": name, "warmup": False, "counters": {}, "requests": reqs}

    every, none, half = (lambda i: True), (lambda i: False), (lambda i: i % 2 == 0)
    phs = [phase("full_prefill", every, good, 2.0, -0.2), phase("full_prefill_cached", every, good, 0.1, -0.21),
           phase("full_prefill_kvplug", every, good, 2.1, -0.2), phase("concat", none, bad, 0.2, -2.2),
           phase("ratio_1", every, good, 2.4, -0.2), phase("query_0.15", half, bad, 0.6, -0.7)]
    return {p["name"]: p for p in phs}


def test_family_report_and_headline_by_family(qs):
    f = br.family_report("synthetic", qs, _phases(qs), ["query"])
    assert f["reference"] == "full_prefill_kvplug" and f["n_questions"] == len(qs.items)
    cfg = f["configs"]
    assert cfg["concat"]["accuracy"] == 0.0 and cfg["query_0.15"]["accuracy"] == 0.5
    assert cfg["concat"]["kl_mean"] > cfg["query_0.15"]["kl_mean"] > 0 == cfg["ratio_1"]["kl_mean"]
    assert cfg["query_0.15"]["vs_concat_acc_ci95"][1] > 0 and cfg["query_0.15"]["vs_concat_loglik_ci95"][0] > 0
    assert f["noise_floor"]["loglik_gap_mean"] == pytest.approx(0.01)  # the prefix-cache repeat vs vLLM alone
    h = br.headline({"synthetic": f, "hotpot": f}, "query_0.15")
    for key in ("n_questions", "default_acc_gap_pts", "default_kl", "concat_kl", "default_loglik_gap",
                "default_ttft_ratio", "ratio0_ttft_ratio", "ratio1_ttft_ratio"):
        assert set(h[key]) == {"synthetic", "hotpot"}, key
    assert h["default_acc_gap_pts"]["synthetic"] == pytest.approx(50.0)
    assert h["default_loglik_gap"]["synthetic"] == pytest.approx(0.5)
    assert h["default_ttft_ratio"]["synthetic"] == pytest.approx(0.3) and h["ratio0_ttft_ratio"]["hotpot"] == 0.1
    assert h["ratio1_ttft_ratio"]["synthetic"] == pytest.approx(1.2)
    lo, hi = h["default_acc_gap_pts_ci95"]["synthetic"]
    assert lo <= 50.0 <= hi  # the gap's interval, in points, full prefill minus the default
    slim = br.slim_requests(_phases(qs))
    assert "first_token_logprobs" not in slim["concat"][0] and slim["concat"][0]["first_token"] == "2"


def test_frontier_plot_is_written(qs, tmp_path):
    import plots

    f = br.family_report("synthetic", qs, _phases(qs), ["query"])
    out = plots.blend_frontier({"families": {"synthetic": f}}, tmp_path / "frontier.png")
    assert out.exists() and out.stat().st_size > 10_000


class _FakeLLM:
    """Just enough of vllm.LLM for blend_engine._answer: a tokenizer and a prefix-cache reset."""

    def __init__(self, ids):
        self.ids, self.resets = ids, 0

    def get_tokenizer(self):
        ids = self.ids

        class Tok:
            def encode(self, text, add_special_tokens):
                assert add_special_tokens is False
                return list(ids)
        return Tok()

    def reset_prefix_cache(self):
        self.resets += 1


def test_a_generation_that_begins_with_the_answer_is_its_own_teacher_forcing(monkeypatch):
    calls = []
    monkeypatch.setattr(blend_engine, "_force", lambda llm, req, kv, salt, ids: calls.append((kv, salt, ids))
                        or ([-0.5, -0.25], {"kvplug_blend_requests": 1.0}))
    llm, req = _FakeLLM([7, 8]), {"id": "f/0", "answer": " x"}
    lps = [{7: -0.1, 3: -2.0}, {8: -0.2, 4: -1.0}, {9: -0.3}]
    rec = {}
    blend_engine._answer(llm, rec, req, {"recompute_ratio": 0.15}, "salt", "fresh", [7, 8, 9], lps)
    assert rec == {"answer_logprobs": [-0.1, -0.2], "forced_from": "generation"} and not calls and llm.resets == 0
    rec = {}
    blend_engine._answer(llm, rec, req, {"recompute_ratio": 0.15}, "salt", "fresh", [7, 4], lps)
    assert rec["answer_logprobs"] == [-0.5, -0.25] and rec["forced_from"] == "fresh" and llm.resets == 1
    assert calls == [({"recompute_ratio": 0.15}, "salt", [7, 8])]  # same kv_params and salt as the generation
    rec = {}
    blend_engine._answer(llm, rec, req, None, None, "reuse", [3], lps)
    assert rec["forced_from"] == "reuse" and llm.resets == 1  # served from vLLM's prefix cache: no reset


def test_a_failed_forcing_is_recorded_not_raised(monkeypatch):
    def boom(*a):
        raise RuntimeError("forced [7, 8], got [1, 2]")
    monkeypatch.setattr(blend_engine, "_force", boom)
    rec = {}
    blend_engine._answer(_FakeLLM([7, 8]), rec, {"id": "f/0", "answer": " x"}, None, None, "fresh", [1], [{1: -1.0}])
    assert rec["answer_logprobs"] is None and "got [1, 2]" in rec["forced_error"]


def test_explain_failure_names_rejected_keys():
    log = "ValueError: kv_connector_extra_config: 'blend_cpu_bytes' is no longer a key: chunk KV now shares"
    msg = blend_engine.explain_failure(log, 1, {"blend": True})
    assert "rejected its keys" in msg and "blend_cpu_bytes" in msg
    assert "rc=3" in blend_engine.explain_failure("boom\nRuntimeError: x", 3, None)


def test_help_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "blend.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--json" in proc.stdout and "--model" in proc.stdout


def test_report_prints_tables_and_the_headline(qs, capsys):
    f = br.family_report("synthetic", qs, _phases(qs), ["query"])
    br.print_report({"families": {"synthetic": f}, "headline": br.headline({"synthetic": f}, "query_0.15"),
                     "errors": {}})
    out = capsys.readouterr().out
    assert "query_0.15" in out and "default_kl" in out and "ratio0_ttft_ratio" in out


def test_resume_runs_the_warmup_and_the_unfinished_phases_only(monkeypatch, tmp_path):
    spec = {"requests": [{"id": "a"}], "phases": [
        {"name": n, "warmup": n == "warmup", "requests": "all"}
        for n in ("warmup", "full_prefill_kvplug", "concat", "ratio_1", "full_prefill_kvplug_after")]}
    done = [("warmup", True), ("full_prefill_kvplug", False), ("concat", False)]
    prior = {"engine_start_s": 1.0, "phases": [{"name": n, "warmup": w} for n, w in done]}
    seen = {}

    def fake_spawn(name, rest, work, env, timeout_s):
        seen.update(name=name, phases=[p["name"] for p in rest["phases"]], requests=rest["requests"])
        return {"engine_start_s": 2.0, "complete": True,
                "phases": [{"name": p["name"], "warmup": p["warmup"]} for p in rest["phases"]]}

    monkeypatch.setattr(blend, "spawn_engine", fake_spawn)
    merged = blend.resume_engine("blend", spec, prior, tmp_path, {}, 10)
    assert seen == {"name": "blend.resume", "phases": ["warmup", "ratio_1", "full_prefill_kvplug_after"],
                    "requests": spec["requests"]}
    assert [p["name"] for p in merged["phases"]] == ["warmup", "full_prefill_kvplug", "concat", "ratio_1",
                                                     "full_prefill_kvplug_after"]
    assert [r["first_phase"] for r in merged["engine_runs"]] == ["warmup", "ratio_1"] and merged["complete"]
    assert (tmp_path / "blend.out.json").exists()
