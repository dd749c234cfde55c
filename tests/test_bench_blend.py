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
    assert blend.kl_first_token(lp, dict(lp)) == pytest.approx(0.0, abs=1e-12)


def test_kl_positive_for_different_distributions():
    ref = {1: -0.1, 2: -2.5, 3: -4.0}
    q = {1: -1.5, 2: -0.4, 3: -3.0}
    assert blend.kl_first_token(ref, q) > 0.1
    # a token missing from q takes q's smallest logprob, which makes it worse, not undefined
    q_missing = {1: -0.1, 2: -2.5, 9: -6.0}
    kl = blend.kl_first_token(ref, q_missing)
    assert kl > 0 and math.isfinite(kl)


def test_kl_uses_reference_top_k_only():
    ref = {i: -float(i) for i in range(25)}  # 25 entries: only the top 20 count
    q = dict(ref)
    q[24] = 0.0  # differs only outside the reference's top 20
    assert blend.kl_first_token(ref, q, k=20) == pytest.approx(0.0, abs=1e-12)
    assert blend.kl_first_token({}, q) != blend.kl_first_token({}, q)  # nan


def test_top1_and_agreement_counting():
    assert blend.top1({"5": -0.2, "7": -1.0}) == "5"
    assert blend.top1_agree({"5": -0.2, "7": -1.0}, {"5": -0.9, "7": -1.0})
    assert not blend.top1_agree({"5": -0.2, "7": -1.0}, {"5": -1.9, "7": -1.0})
    assert blend.agreement(["a", "b", "c"], ["a", "x", "c"]) == (2, 3)
    assert blend.value_agreement([" 12.", " 12.\n\nThe", " 13", "none"], [" 12.", " 12.", " 12", "x"]) == (3, 4)
    with pytest.raises(ValueError):
        blend.agreement(["a"], ["a", "b"])


def test_summarize_recomputed_fraction_and_ratios():
    def req(i, text, lp, ttft):
        return {"id": i, "text": text, "first_token_logprobs": lp, "ttft_s": ttft, "prompt_tokens": 100}

    ref = {"name": "full_prefill", "counters": {},
           "requests": [req(0, " 1.", {"1": -0.1, "2": -3.0}, 2.0), req(1, " 2.", {"2": -0.1, "1": -3.0}, 2.0)]}
    run = {"name": "fixed_0.15", "counters": {"kvplug_blend_requests": 4, "kvplug_blend_tokens": 380,
                                               "kvplug_blend_recomputed_tokens": 60},
           "requests": [req(0, " 1.", {"1": -0.1, "2": -3.0}, 0.5), req(1, " 3.", {"1": -0.2, "2": -2.0}, 1.5)]}
    gold = {0: lambda t: mq.answer_correct(t, "1"), 1: lambda t: mq.answer_correct(t, "2")}
    s = blend.summarize(run, ref, gold)
    assert s["answer_agree"] == 0.5 == s["value_agree"] and s["accuracy"] == 0.5 and s["top1_agree"] == 0.5
    assert s["recomputed_frac_of_prompt"] == pytest.approx(60 / 400)  # 4 blended requests x 100
    assert s["recomputed_frac_of_blend_tokens"] == pytest.approx(60 / 380)
    assert s["ttft_p50_s"] == 1.0 and s["ttft_ratio_vs_full"] == 0.5
    assert s["kl_mean"] > 0 and s["disagreements"] == [{"id": 1, "got": " 3.", "want": " 2."}]
    s_ref = blend.summarize(ref, None, gold)
    assert s_ref["accuracy"] == 1.0 and math.isnan(s_ref["recomputed_frac_of_prompt"])


def test_config_phases_blend_warmup_first(qs):
    vllm, bl = blend.config_phases(qs, blend.ALL_CONFIGS)
    assert [p["name"] for p in vllm] == ["full_prefill", "vllm_prefix_cache"]
    assert [p["reset_each"] for p in vllm] == [True, False]
    assert [p["name"] for p in bl] == ["warmup", "fixed_0", "fixed_0.05", "fixed_0.15", "fixed_0.3",
                                       "fixed_1", "adaptive"]
    assert len(bl[0]["prompts"]) == 24 and bl[0]["warmup"]  # the whole pool
    assert all(p["reset_each"] for p in bl[1:])
    assert bl[-1]["kv_params"] == {"recompute_ratio": 0.15, "recompute_policy": "adaptive"}
    assert bl[3]["kv_params"] == {"recompute_ratio": 0.15, "recompute_policy": "fixed"}
    assert blend.config_phases(qs, ["full_prefill"])[1] == []


def test_explain_failure_names_rejected_blend_keys():
    log = "ValueError: kv_connector_extra_config: unknown key(s) 'blend'; allowed keys are cpu_bytes"
    msg = blend.explain_failure(log, 1, {"blend": True})
    assert "rejected the blend keys" in msg and "unknown key(s) 'blend'" in msg
    assert "rc=3" in blend.explain_failure("boom\nRuntimeError: x", 3, None)


def test_help_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "blend.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--json" in proc.stdout and "--model" in proc.stdout
