"""Blend benchmark (benchmarks/blend.py) and its multi-document QA set: pure Python, no engine."""
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


def test_kl_positive_for_different_distributions():
    ref = {1: -0.1, 2: -2.5, 3: -4.0}
    q = {1: -1.5, 2: -0.4, 3: -3.0}
    assert bm.kl_first_token(ref, q) > 0.1
    # a token missing from q takes q's smallest logprob, which makes it worse, not undefined
    q_missing = {1: -0.1, 2: -2.5, 9: -6.0}
    kl = bm.kl_first_token(ref, q_missing)
    assert kl > 0 and math.isfinite(kl)


def test_kl_uses_reference_top_k_only():
    ref = {i: -float(i) for i in range(25)}  # 25 entries: only the top 20 count
    q = dict(ref)
    q[24] = 0.0  # differs only outside the reference's top 20
    assert bm.kl_first_token(ref, q, k=20) == pytest.approx(0.0, abs=1e-12)
    assert bm.kl_first_token({}, q) != bm.kl_first_token({}, q)  # nan


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
def test_every_policy_at_every_ratio_plus_the_shared_endpoints():
    names = blend.config_names(quick=False)
    assert names[:2] == ["concat", "ratio_1"] and len(names) == 2 + len(blend.POLICIES) * len(blend.RATIOS)
    assert blend.kv_params("concat") == {"recompute_ratio": 0.0, "recompute_policy": "query"}
    assert blend.kv_params("fixed_0.15") == {"recompute_ratio": 0.15, "recompute_policy": "fixed"}
    from kvplug.config import RECOMPUTE_POLICIES

    assert set(blend.POLICIES) == set(RECOMPUTE_POLICIES)  # the benchmark runs every named policy
    assert set(blend.QUICK_CONFIGS) <= set(names)


def test_summarize_accuracy_agreement_recomputed_and_ttft_ratio(qs):
    items = qs.items[:2]

    def req(it, text, lp, ttft, counters=None):
        return {"id": f"synthetic/{it.qid}", "text": text, "first_token_logprobs": lp, "ttft_s": ttft,
                "prompt_tokens": 100, "counters": counters or {}}

    ref = [req(items[0], f" {items[0].answer}.", {"1": -0.1, "2": -3.0}, 2.0),
           req(items[1], f" {items[1].answer}.", {"2": -0.1, "1": -3.0}, 2.0)]
    c = {"kvplug_blend_requests": 1, "kvplug_blend_tokens": 190, "kvplug_blend_recomputed_tokens": 30}
    run = [req(items[0], f" {items[0].answer}. The", {"1": -0.1, "2": -3.0}, 0.5, c),
           req(items[1], " 3.", {"1": -0.2, "2": -2.0}, 1.5, c)]
    s = blend.summarize("fixed_0.15", run, ref, qs, {})
    assert s["accuracy"] == 0.5 and s["value_agree"] == 0.5 and s["text_agree"] == 0.0 and s["top1_agree"] == 0.5
    assert s["recomputed_frac_of_blend_tokens"] == pytest.approx(60 / 380)
    assert s["ttft_p50_s"] == 1.0 and s["ttft_ratio_vs_full"] == 0.5 and s["kl_mean"] > 0
    assert (s["policy"], s["ratio"]) == ("fixed", 0.15) and s["correct"] == [1, 0]
    lo, hi = s["accuracy_ci95"]
    assert lo < 0.5 < hi


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
