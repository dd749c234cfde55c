"""The quality guard: the blend audit (exact span vs blended span, the question's next-token KL)
against what must hold - zero at ratio 1, falling as more is recomputed on real text, past a bound
for a chunk whose keys were never re-rotated - and the controller that raises the ratio on it."""
import sys
from pathlib import Path

import pytest
import torch

from kvplug.blend.blender import BlendJob
from kvplug.blend.guard import STEPS, QualityGuard
from test_blender import Blender, DictStore, Toy, concat_reference, prompt, warm

ROOT = Path(__file__).resolve().parents[2]


def audited(tokens, chunks, end, ratio, policy="query"):
    return BlendJob(tokens, 0, end, chunks, torch.arange(end), ratio, policy, tail=tokens[end:end + 5], audit=True)


def test_an_audit_at_ratio_one_finds_nothing_and_never_touches_the_engines_cache():
    tokens, chunks, end = prompt()
    plain, checked = Toy(), Toy()
    for toy in (plain, checked):
        b = Blender(toy, DictStore(), head_tokens=2)
        warm(b, tokens, chunks)
        r = b.run(audited(tokens, chunks, end, 1.0) if toy is checked else
                  BlendJob(tokens, 0, end, chunks, torch.arange(end), 1.0, "query", tail=tokens[end:end + 5]))
    assert r.kl is not None and abs(r.kl) < 1e-6 and r.top1_agree
    assert torch.equal(plain.written_kv(), checked.written_kv())  # the exact pass wrote nothing


def test_the_audit_compares_against_an_exact_prefill_not_the_blend():
    """At ratio 0 the cache holds the re-rotated concatenation; the audit's exact side is the full
    prefill (the toy's reference), so their KL is the concatenation's error, well above zero."""
    toy = Toy()
    tokens, chunks, end = prompt()
    b = Blender(toy, DictStore())
    warm(b, tokens, chunks)
    r = b.run(audited(tokens, chunks, end, 0.0))
    torch.testing.assert_close(toy.written_kv(), concat_reference(toy, tokens, chunks, end), rtol=1e-4, atol=1e-4)
    assert r.kl > 1e-3


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2-135M in float32 through transformers (`make model` builds it; `make test` does too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from models import ensure_default_model

    path = ensure_default_model(ROOT / ".data")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def essay_prompts(tok, n_prompts: int, docs: int, doc_tokens: int):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from workloads.text import load_corpus, make_documents

    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    pool = make_documents(docs + n_prompts, doc_tokens, 3, enc, load_corpus())
    question = enc(" Question: what is the main point of the passages above? Answer:")
    for p in range(n_prompts):
        parts = [enc("Read the passages.")] + [enc(d) for d in pool[p:p + docs]]
        tokens, chunks, at = [], [], 0
        for i, part in enumerate(parts):
            chunks.append((at, at + len(part), bytes([p, i]) * 16 if i else None))
            tokens += part
            at += len(part)
        yield tokens + question, chunks, at


@pytest.fixture(scope="module")
def essays(smollm):
    """Three essay prompts with their passages' KV computed on their own (positions 0..n-1)."""
    from kvplug.blend.hf_adapter import HFModelAdapter

    model, tok = smollm
    out = []
    for tokens, chunks, end in essay_prompts(tok, n_prompts=3, docs=3, doc_tokens=50):
        store = DictStore()
        for b_, e_, key in chunks:
            if key is not None:
                store.put(key, Blender(HFModelAdapter(model, e_ - b_), None).compute_chunk(tokens[b_:e_]))
        out.append((tokens, chunks, end, store))
    return out


def blended_kls(model, prompts, ratios, corrupt_keys_by: int = 0) -> dict[float, list[float]]:
    """Audited KL per ratio over the prompts; corrupt_keys_by > 0 blends every passage with its keys
    rotated that many positions too far, as a chunk saved without its keys rotated back would be."""
    from kvplug.blend.hf_adapter import HFModelAdapter
    from kvplug.ops.rope import rerotate_keys_ref

    kl = {r: [] for r in ratios}
    for tokens, chunks, end, store in prompts:
        m = HFModelAdapter(model, len(tokens))
        if corrupt_keys_by:
            bad = DictStore()
            for key, kv in store.d.items():
                kv = kv.clone()
                pos = torch.arange(kv.shape[2])
                kv[:, 0] = rerotate_keys_ref(kv[:, 0], pos, pos + corrupt_keys_by, *m.rope)
                bad.put(key, kv)
            store = bad
        for ratio in kl:
            b = Blender(HFModelAdapter(model, len(tokens)), store, head_tokens=2)
            job = BlendJob(tokens, 0, end, chunks, torch.arange(end), ratio, "query", tail=tokens[end:], audit=True)
            kl[ratio].append(b.run(job).kl)
    return kl


def mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def healthy(smollm, essays):
    return {r: mean(v) for r, v in blended_kls(smollm[0], essays, (0.0, 0.15, 0.3, 1.0)).items()}


def test_audited_kl_falls_as_more_is_recomputed_on_real_text(healthy):
    kl = healthy
    assert kl[0.0] > kl[0.15] > kl[0.3] > kl[1.0]
    assert kl[1.0] < 1e-4 and kl[0.0] > 1e-2, kl


def test_chunks_whose_keys_were_never_rotated_back_raise_the_kl_far_past_a_healthy_blends(smollm, essays, healthy):
    """A bug of the kind the guard exists for: the audited KL at the default ratio jumps well past
    a healthy blend's, and past a bound (0.1 nats) the controller acts on."""
    broken = mean(blended_kls(smollm[0], essays, (0.15,), corrupt_keys_by=300)[0.15])
    assert broken > 0.1 and broken > 5 * healthy[0.15], (healthy, broken)


def test_the_guard_raises_the_floor_a_step_per_bad_window_and_lowers_it_when_kl_is_well_below():
    g = QualityGuard(max_kl=0.1, window=3)
    assert g.floor == 0.0
    assert g.observe(0.5) is None and g.observe(0.5) is None  # a window is 3 audits
    assert "raised to 0.15" in g.observe(0.5)
    for _ in range(3 * (len(STEPS) + 2)):  # badly wrong blends: up one step per window, to 1.0
        g.observe(2.0)
    assert g.floor == 1.0
    assert [g.observe(0.06) for _ in range(3)] == [None] * 3  # between max_kl / 4 and max_kl: hold
    assert g.floor == 1.0
    g.observe(0.01), g.observe(0.01)
    assert "lowered to 0.75" in g.observe(0.01)
    with pytest.raises(ValueError):
        QualityGuard(max_kl=0)
