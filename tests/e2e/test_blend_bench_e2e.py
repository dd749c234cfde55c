"""End to end on real vLLM (CPU, fp32, the tiny Llama): the blend benchmark's engine
(benchmarks/blend_engine.py) scores the gold answer by teacher forcing.

The oracle is Hugging Face transformers in fp32: the log-softmax of the logits at the answer's
positions with the answer appended to the prompt. The benchmark gets the same numbers from a
request whose output the ForceAnswer logits processor forces to the answer (after a reset: a
full prefill, or a blend again) and from vLLM's prefix cache (the noise-floor repeat); the
generation's own logprobs are the same quantity (so a generation that begins with the answer
stands in for the forcing request: tests/test_bench_blend.py); at recompute ratio 1.0 the blended KV
equals a full prefill, so the forced answer's logprobs do too.
"""
import os
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from tiny_model import tiny_model_path  # noqa: E402

pytestmark = pytest.mark.e2e
SEP = " # # "
SYSTEM = "You answer questions about the documents below. Documents follow."
DOCS = [" ".join(f"fact{(s * 31 + i * 17) % 97} about topic {s} is value{(s * i) % 89}" for i in range(16))
        for s in range(4)]
PROMPTS = [SEP.join([SYSTEM, DOCS[2], DOCS[0], DOCS[3], "question: what is fact5 about topic 2?"]),
           SEP.join([SYSTEM, DOCS[1], DOCS[3], DOCS[0], "question: what is fact9 about topic 3?"])]
SUFFIX = " about topic 9"


@pytest.fixture(scope="module")
def model():
    return str(tiny_model_path())


@pytest.fixture(scope="module")
def hf(model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()

    def teacher_forced(prompt: str, answer: str) -> list[float]:
        p, a = tok(prompt).input_ids, tok.encode(answer, add_special_tokens=False)
        with torch.no_grad():
            lp = torch.log_softmax(net(torch.tensor([p + a])).logits[0].float(), -1)
        return [lp[len(p) - 1 + i, t].item() for i, t in enumerate(a)]

    def runner_up(prompt: str) -> str:
        """An answer whose first token is the model's second choice (so the generation does not
        begin with it and a forcing request runs) and whose text encodes back to the same tokens."""
        with torch.no_grad():
            order = net(torch.tensor([tok(prompt).input_ids])).logits[0, -1].argsort(descending=True).tolist()
        for t in order[1:]:
            text = tok.decode([t]) + SUFFIX
            if tok.encode(text, add_special_tokens=False)[0] == t:
                return text
        raise AssertionError("no decodable runner-up token")

    return SimpleNamespace(teacher_forced=teacher_forced, runner_up=runner_up)


@pytest.fixture(scope="module")
def forced(hf):
    return hf.runner_up(PROMPTS[0])


@pytest.fixture(scope="module")
def result(model, forced, tmp_path_factory):
    from blend_engine import spawn_engine

    reqs = [{"id": "q/0", "prompt": PROMPTS[0], "max_tokens": 6, "answer": forced},
            {"id": "q/1", "prompt": PROMPTS[1], "max_tokens": 6, "answer": " fact9 about"}]
    warm = [{"id": f"w/{i}", "prompt": SEP.join([SYSTEM, d, "question: which document?"]), "max_tokens": 1}
            for i, d in enumerate(DOCS)]
    same = {"reset_each": True, "warmup": False, "forced": "fresh", "requests": reqs}
    spec = {"model": model, "dtype": "float32", "max_model_len": 2048, "engine_warmup_prompt": SYSTEM + DOCS[0],
            "extra": {"cpu_bytes": 1e8, "blend": True, "blend_min_chunk_tokens": 8, "blend_cost_gate": False,
                      "blend_audit_rate": 0.0}, "phases": [
                {"name": "warmup", "reset_each": False, "warmup": True, "requests": warm,
                 "kv_params": {"recompute_ratio": 1.0, "recompute_policy": "fixed"}},
                {"name": "full", **same, "salt_each": True, "repeat_cached": True,
                 "kv_params": {"blend": False, "save": False}},
                {"name": "ratio_1", **same, "kv_params": {"recompute_ratio": 1.0, "save": False}},
                {"name": "concat", **same, "kv_params": {"recompute_ratio": 0.0, "save": False}}]}
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = spawn_engine("forced", spec, tmp_path_factory.mktemp("forced"), env, 900)
    assert "error" not in res, res.get("error")
    return {ph["name"]: {r["id"]: r for r in ph["requests"]} for ph in res["phases"]}


def _close(got, want, tol=2e-3):
    assert got is not None and len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want)) < tol, (got, want)


def test_forced_answer_logprobs_equal_transformers_teacher_forcing(result, hf, forced):
    r = result["full"]["q/0"]
    assert r["forced_from"] == "fresh" and not r["text"].startswith(forced)
    _close(r["answer_logprobs"], hf.teacher_forced(PROMPTS[0], forced))


def test_the_generation_returns_the_same_logprobs_as_the_forcing_request(result, model, forced):
    """What lets a generation that begins with the answer stand in for the forcing request: both
    return vLLM's raw logprobs of the same computation (checked at the first answer token)."""
    from transformers import AutoTokenizer

    first = AutoTokenizer.from_pretrained(model).encode(forced, add_special_tokens=False)[0]
    for phase in ("full", "ratio_1", "concat"):
        r = result[phase]["q/0"]
        assert str(first) in r["first_token_logprobs"], phase  # among the generation's top 50
        assert abs(r["first_token_logprobs"][str(first)] - r["answer_logprobs"][0]) < 1e-4, phase


def test_prefix_cache_repeat_scores_the_same_answer(result, hf, forced):
    r = result["full_cached"]["q/0"]
    assert r["forced_from"] == "reuse"
    _close(r["answer_logprobs"], hf.teacher_forced(PROMPTS[0], forced))


def test_blend_at_ratio_1_scores_like_a_full_prefill(result):
    for qid in ("q/0", "q/1"):
        r = result["ratio_1"][qid]
        assert r["counters"].get("kvplug_blend_requests", 0) >= 1  # the generation was blended
        _close(r["answer_logprobs"], result["full"][qid]["answer_logprobs"])
    forced = result["ratio_1"]["q/0"]  # the forcing request blended again, not served from vLLM's cache
    assert forced["forced_from"] == "fresh" and forced["forced_counters"].get("kvplug_blend_requests", 0) >= 1


def test_concat_answers_are_scored_too(result):
    c, full = result["concat"]["q/0"], result["full"]["q/0"]
    assert c["forced_from"] == "fresh" and len(c["answer_logprobs"]) == len(full["answer_logprobs"])
    assert c["counters"].get("kvplug_blend_recomputed_tokens", 0) == 0 < c["counters"].get("kvplug_blend_tokens", 0)
