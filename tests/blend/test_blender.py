"""The blender over a toy decoder (no vLLM): its writes against a plain reference forward.

The toy is a small pre-norm transformer with RoPE and grouped KV heads. `reference_kv` computes
its KV with an explicit softmax over a causal mask, independently of the blender's attention.
"""
import pytest
import torch

from kvplug.blend import blender as product
from kvplug.blend.blender import BlendJob
from kvplug.blend.selection import POLICIES, adaptive_budget, chunk_heads, global_budget, pick_tokens
from kvplug.ops.rope import rerotate_keys_ref, rope_inv_freq

L, H, KV, D, HID, VOCAB = 3, 4, 2, 8, 32, 50


def rotate(x, pos, inv_freq):  # neox RoPE at absolute positions, x [T, heads, D]
    return rerotate_keys_ref(x, torch.zeros_like(pos), pos, inv_freq, "neox")


class Toy:
    num_layers, num_heads, num_kv_heads, head_dim = L, H, KV, D
    dtype, device = torch.float32, torch.device("cpu")

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g) * 0.4  # noqa: E731
        self.emb = r(VOCAB, HID) * 2
        self.w = [dict(q=r(HID, H * D), k=r(HID, KV * D), v=r(HID, KV * D), o=r(H * D, HID)) for _ in range(L)]
        self.scale = D ** -0.5
        self.inv_freq = rope_inv_freq(D, 100.0)
        self.written, self.cache = {}, {}

    @property
    def rope(self):
        return self.inv_freq, "neox"

    def embed(self, ids):
        return self.emb[ids]

    def _qkv(self, i, x, pos):
        h = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        w = self.w[i]
        q = rotate((h @ w["q"]).view(-1, H, D), pos, self.inv_freq)
        k = rotate((h @ w["k"]).view(-1, KV, D), pos, self.inv_freq)
        return q, k, (h @ w["v"]).view(-1, KV, D)

    def forward_layer(self, i, positions, hidden, residual, attend):
        x = hidden if residual is None else hidden + residual
        q, k, v = self._qkv(i, x, positions)
        out = attend(q.reshape(-1, H * D), k.reshape(-1, KV * D), v.reshape(-1, KV * D))
        return out @ self.w[i]["o"], x

    def logits(self, hidden, residual):  # final RMS norm, tied embeddings
        x = hidden if residual is None else hidden + residual
        return (x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ self.emb.T

    def write_kv(self, i, k, v, slots):
        self.written[i] = (slots.clone(), k.clone(), v.clone())
        cache = self.cache.setdefault(i, {})
        for s_, kk, vv in zip(slots.tolist(), k.clone(), v.clone()):
            cache[s_] = (kk, vv)

    def read_kv(self, i, slots):
        rows = [self.cache[i][s_] for s_ in slots.tolist()]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def written_kv(self):  # [L, 2, T, KV, D] in slot order
        return torch.stack([torch.stack([self.written[i][1], self.written[i][2]]) for i in range(L)])

    def reference_kv(self, tokens):
        """Plain full prefill from position 0: [L, 2, T, KV, D]."""
        n = len(tokens)
        pos = torch.arange(n)
        x, out = self.emb[torch.tensor(tokens)], []
        causal = torch.ones(n, n).tril().bool()
        for i in range(L):
            q, k, v = self._qkv(i, x, pos)
            out.append(torch.stack([k, v]))
            kk, vv = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
            s = torch.einsum("qhd,khd->hqk", q, kk) * self.scale
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)
            x = x + torch.einsum("hqk,khd->qhd", p, vv).reshape(n, H * D) @ self.w[i]["o"]
        return torch.stack(out)


class Blender(product.Blender):
    """The product's Blender fed from a store, as these tests feed it: a job without chunk_kv gets
    the store's chunks (the worker hands every job the chunks it loaded)."""

    def __init__(self, adapter, store=None, **kwargs):
        super().__init__(adapter, **kwargs)
        self.store = store

    def _gather(self, job):
        if job.chunk_kv is None and self.store is not None:
            job.chunk_kv = self.store.d if isinstance(self.store, DictStore) else self.store
        return super()._gather(job)

    @torch.inference_mode()
    def compute_chunk(self, tokens: list[int]) -> torch.Tensor:
        """The chunk's KV with nothing before it, at positions 0..n-1: [L, 2, n, KV, D], through the
        adapter's layers and the blender's attention (what a store holds for these tests)."""
        m = self.m
        n = len(tokens)
        out = torch.empty((m.num_layers, 2, n, m.num_kv_heads, m.head_dim), dtype=m.dtype, device=m.device)
        pos = torch.arange(n, device=m.device)
        hidden, residual = m.embed(torch.tensor(tokens, dtype=torch.long, device=m.device)), None
        for i in range(m.num_layers):
            def attend(q, k, v, layer=out[i], window=self.kinds.window(i)):
                layer[0], layer[1] = k.view(n, m.num_kv_heads, m.head_dim), v.view(n, m.num_kv_heads, m.head_dim)
                return self._attention(q.view(n, m.num_heads, m.head_dim), layer[0], layer[1], pos, window)
            hidden, residual = m.forward_layer(i, pos, hidden, residual, attend)
        return out


class DictStore:
    def __init__(self):
        self.d, self.puts = {}, 0

    def get(self, key):
        return self.d.get(key)

    def put(self, key, kv):
        self.puts += 1
        self.d[key] = kv.clone()


def prompt(seed=1, sizes=(7, 20, 25, 18)):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (sum(sizes) + 5,), generator=g).tolist()
    chunks, at = [], 0
    for i, n in enumerate(sizes):
        chunks.append((at, at + n, bytes([i]) * 32))
        at += n
    return tokens, chunks, at


def concat_reference(toy, tokens, chunks, end):
    pieces = []
    for b, e, _ in chunks:
        kv = toy.reference_kv(tokens[b:e])
        kv[:, 0] = rerotate_keys_ref(kv[:, 0], torch.arange(e - b), torch.arange(b, e), toy.inv_freq, "neox")
        pieces.append(kv)
    return torch.cat(pieces, 2)[:, :, :end]


def warm(blender, tokens, chunks):
    for b, e, key in chunks:
        if key is not None:
            blender.store.put(key, blender.compute_chunk(tokens[b:e]))


def job(tokens, chunks, end, ratio, start=0, policy="fixed"):
    return BlendJob(tokens, start, end, chunks, torch.arange(start, end), ratio, policy, tail=tokens[end:end + 4])


def test_compute_chunk_is_the_reference_prefill():
    toy = Toy()
    tokens, _, _ = prompt()
    got = Blender(toy, DictStore()).compute_chunk(tokens[:40])
    torch.testing.assert_close(got, toy.reference_kv(tokens[:40]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("start", [0, 7, 12])
def test_ratio_one_is_a_full_prefill(start, policy):
    """start 7 = chunk 0 held by the engine; 12: part of chunk 1 too (the engine's prefix cache).
    What the engine holds for [0, start) is read back from it and attended to as it is."""
    toy = Toy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore(), head_tokens=3)
    warm(blender, tokens, chunks)
    want = toy.reference_kv(tokens[:end])
    for i in range(L):  # the engine's own prefill of [0, start)
        toy.write_kv(i, want[i, 0, :start], want[i, 1, :start], torch.arange(start))
    report = blender.run(job(tokens, chunks, end, 1.0, start, policy))
    assert report.recomputed == end - start and report.chunk_hits == (4 if start < 7 else 3)
    torch.testing.assert_close(toy.written_kv(), want[:, :, start:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_ratio_zero_is_the_rerotated_concatenation(policy):
    toy = Toy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore(), head_tokens=3)
    warm(blender, tokens, chunks)
    assert blender.run(job(tokens, chunks, end, 0.0, policy=policy)).recomputed == 0
    torch.testing.assert_close(toy.written_kv(), concat_reference(toy, tokens, chunks, end), rtol=1e-4, atol=1e-4)
    assert (toy.written_kv() - toy.reference_kv(tokens[:end])).abs().max() > 1e-2  # an approximation


def test_partial_ratio_recomputes_only_the_picked_tokens():
    toy = Toy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore(), check_layer=0)
    warm(blender, tokens, chunks)
    report = blender.run(job(tokens, chunks, end, 0.25))
    assert report.recomputed == round(0.25 * end)
    concat = concat_reference(toy, tokens, chunks, end)
    written = toy.written_kv()
    for i in range(1, L):  # after the check layer only picked tokens change
        changed = ((written[i] - concat[i]).abs().amax(dim=(0, 2, 3)) > 1e-4).sum()
        assert 0 < changed <= report.recomputed


@pytest.mark.parametrize("policy", [p for p in POLICIES if POLICIES[p].runs_check_pass])
def test_a_budget_of_nothing_keeps_the_cached_kv_after_the_check_layer(policy):
    """ratio > 0 but too small to pick a token (or an adaptive budget of 0): the check layer's
    full pass is written, every later layer gets the cached KV, nothing crashes."""
    toy = Toy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore(), check_layer=0)
    warm(blender, tokens, chunks)
    report = blender.run(BlendJob(tokens, 0, end, chunks, torch.arange(end), 0.001, policy, tail=[1, 2]))
    assert report.recomputed == 0
    written, concat = toy.written_kv(), concat_reference(toy, tokens, chunks, end)
    torch.testing.assert_close(written[1:], concat[1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(written[0], toy.reference_kv(tokens[:end])[0], rtol=1e-4, atol=1e-4)


def test_a_chunk_with_a_key_that_is_not_cached_is_an_error_not_a_guess():
    """The scheduler claims only cached chunks; a missing one must fail the blend (vLLM then
    recomputes), never be computed or skipped here."""
    toy = Toy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore())
    warm(blender, tokens, chunks[:2])
    with pytest.raises(ValueError, match="not cached"):
        blender.run(job(tokens, chunks, end, 0.0))


def test_chunk_payload_is_the_engines_kv_with_keys_back_at_zero():
    """What the worker stores for a chunk vLLM computed: its KV in that context, read back from
    the cache, keys rotated to the chunk's own positions 0..n-1, as the model dtype's bytes."""
    toy = Toy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore())
    warm(blender, tokens, chunks)
    blender.run(job(tokens, chunks, end, 1.0))  # the cache now holds the full prefill
    full = toy.reference_kv(tokens[:end])
    for b, e, _ in chunks:
        want = full[:, :, b:e].clone()
        want[:, 0] = rerotate_keys_ref(want[:, 0], torch.arange(b, e), torch.arange(e - b), toy.inv_freq, "neox")
        got = blender.fmt.kv(blender.fmt.pack(blender.read_chunks([(torch.arange(b, e), b)])[0]))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a stored chunk"):
        blender.fmt.kv(torch.zeros(7, dtype=torch.uint8))


def test_uncacheable_chunks_are_always_recomputed():
    toy = Toy()
    tokens, chunks, end = prompt()
    chunks[0] = (chunks[0][0], chunks[0][1], None)
    blender = Blender(toy, DictStore())
    warm(blender, tokens, chunks[1:])
    report = blender.run(job(tokens, chunks, end, 0.0))
    assert report.recomputed == chunks[0][1] and report.chunk_hits == 3


@pytest.mark.parametrize("tail", [[], [3, 9, 27, 4]])
def test_adaptive_gives_position_zero_nothing_and_never_exceeds_fixed(tail):
    toy = Toy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore())
    warm(blender, tokens, chunks)
    fixed = blender.run(job(tokens, chunks, end, 0.3))
    adaptive = blender.run(BlendJob(tokens, 0, end, chunks, torch.arange(end), 0.3, "adaptive", tail=tail))
    assert 0 < adaptive.recomputed <= fixed.recomputed


@pytest.mark.parametrize("bad", [dict(start=5, end=5), dict(end=999), dict(ratio=1.5), dict(policy="all"),
                                 dict(slots=torch.arange(3)), dict(chunks=[(1, 70, None)])])
def test_bad_jobs_are_rejected(bad):
    tokens, chunks, end = prompt()
    args = dict(tokens=tokens, start=0, end=end, chunks=chunks, slots=torch.arange(end), ratio=0.1, policy="fixed")
    args.update(bad)
    if "end" in bad and "slots" not in bad:
        args["slots"] = torch.arange(max(args["end"] - args["start"], 0))
    with pytest.raises(ValueError):
        Blender(Toy(), DictStore()).run(BlendJob(**args))


def test_budgets_by_hand():
    chunk_of = torch.tensor([-1, 0, 0, 0, 1, 1, -1, 1, 1])
    pooled, budget = global_budget(chunk_of, 0.5)
    assert budget == [round(0.5 * 7)] and pooled.tolist() == [-1, 0, 0, 0, 0, 0, -1, 0, 0]
    # budget 0.5 x 60 = 30, split by share x relevance: weights 0, 0.2, 0.4 -> 0, 10, 20
    assert adaptive_budget([10, 20, 30], [0.0, 0.2, 0.4], [1, 1, 1], 0.5) == [0, 10, 20]
    # the question reads chunk 1 only: it takes the whole budget, capped at its 20 tokens
    assert adaptive_budget([10, 20, 30], [0.3, 0.2, 0.4], [0.0, 1.0, 0.0], 0.5) == [0, 20, 0]
    assert adaptive_budget([10, 20], [0.0, 0.0], [1, 1], 0.5) == [0, 0]
    scores = torch.tensor([9.0, 1, 5, 3, 2, 8, 0, 7, 4])
    assert pick_tokens(scores, chunk_of, [1, 2]).tolist() == [0, 2, 5, 6, 7]


# ---- policies: chunk heads, relevance against deviation -------------------------------------
@pytest.mark.parametrize("policy", [p for p in POLICIES if POLICIES[p].heads])
def test_chunk_heads_are_always_picked(policy):
    toy = Toy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore(), check_layer=0, head_tokens=3)
    warm(blender, tokens, chunks)
    cached = end
    report = blender.run(job(tokens, chunks, end, 12 / cached, policy=policy))  # a budget of 12 tokens
    heads = [b + i for b, _, _ in chunks[1:] for i in range(3)]  # 9 tokens: every chunk but the first
    assert report.recomputed == 12 and set(heads) <= set(report.picked)
    tight = blender.run(job(tokens, chunks, end, 4 / cached, policy=policy))  # fewer than the heads
    firsts = [b for b, _, _ in chunks[1:]]
    assert tight.recomputed == 4 and set(firsts) <= set(tight.picked) <= set(heads)  # offset 0 first


def planted():
    """A toy whose question (token 9, twice) attends to token 7 and to nothing else, with a
    chunk cache in which token B's KV is far off: B deviates, 7 is what the question reads."""
    toy = Toy(seed=3)
    toy.inv_freq = rope_inv_freq(D, 1e12)  # ~no rotation: attention by content only
    g = torch.Generator().manual_seed(5)
    r_kv = torch.randn(KV, D, generator=g)
    for w in toy.w:
        w["q"][0] = 3.0 * r_kv.repeat_interleave(H // KV, 0).reshape(-1)
        w["k"][1] = 3.0 * r_kv.reshape(-1)
        w["q"][1] = 0.0
        w["k"][0] = 0.0
    toy.emb[9] = torch.zeros(HID)
    toy.emb[9, 0] = 6.0
    toy.emb[7] = torch.zeros(HID)
    toy.emb[7, 1] = 6.0
    tokens, chunks, end = prompt()
    tokens = [t if t not in (7, 9) else 11 for t in tokens]
    marker, deviant = 40, 50  # both in chunk 2 ([27, 52))
    tokens[marker] = 7
    tokens[end:end + 4] = [9, 9, 9, 9]
    return toy, tokens, chunks, end, marker, deviant


@pytest.mark.parametrize("gap", [0, 30])
@pytest.mark.parametrize("policy", ["query", "mixed"])
def test_a_token_the_question_reads_outranks_a_deviating_token_it_ignores(policy, gap):
    """gap: the question comes that many tokens after the span (chunks vLLM computes after a miss)."""
    toy, tokens, chunks, end, marker, deviant = planted()
    store = DictStore()
    blender = Blender(toy, store, check_layer=0)
    warm(blender, tokens, chunks)
    b = chunks[2][0]
    store.d[chunks[2][2]][:, :, deviant - b] += 5.0  # the cached KV of one token is far off
    one = 1 / end  # a budget of exactly one token
    assert blender.run(job(tokens, chunks, end, one, policy="fixed")).picked == [deviant]
    j = job(tokens, chunks, end, one, policy=policy)
    j.tail_at = end + gap
    assert blender.run(j).picked == [marker]


def question_pass(m, tail, kv, end, start, clusters=None, top=8, at=None):
    """One question through kvplug's batched relevance pass."""
    from kvplug.blend.relevance import QuestionItem, drain, question_passes

    item = QuestionItem(tail, end if at is None else at, kv, end, start, clusters)
    return drain(question_passes(m, [item], top))[0]


def question_pass_oracle(toy, tail, kv, end, start, at):
    """The question at positions at.. through the toy, one query and head at a time: softmax over
    the span's keys and its own keys up to itself; the weights on the span, averaged."""
    T = len(tail)
    pos = torch.arange(at, at + T)
    hidden, residual, total = toy.embed(torch.tensor(tail)), None, torch.zeros(end)
    for i in range(L):
        def attend(q, k, v, i=i):
            q, k, v = q.view(T, H, D), k.view(T, KV, D), v.view(T, KV, D)
            keys, vals = torch.cat([kv[i, 0], k]), torch.cat([kv[i, 1], v])
            out = torch.zeros(T, H, D)
            for t in range(T):
                for h in range(H):
                    g = h // (H // KV)
                    p = (keys[: end + t + 1, g] @ q[t, h] * toy.scale).softmax(0)
                    total.add_(p[:end])
                    out[t, h] = p @ vals[: end + t + 1, g]
            return out.reshape(T, H * D)
        hidden, residual = toy.forward_layer(i, pos, hidden, residual, attend)
    return (total / (L * H * T))[start:end]


def test_the_question_pass_runs_the_question_at_its_own_positions():
    toy, g = Toy(seed=4), torch.Generator().manual_seed(6)
    end, start, tail = 23, 5, [3, 17, 8, 41, 2]
    kv = torch.randn(L, 2, end, KV, D, generator=g)
    for at in (end, end + 40):
        torch.testing.assert_close(question_pass(toy, tail, kv, end, start, at=at),
                                   question_pass_oracle(toy, tail, kv, end, start, at), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(question_pass(toy, tail, kv, end, start, at=end + 40),
                              question_pass(toy, tail, kv, end, start))  # the positions matter


def test_a_long_question_is_cut_to_its_last_tokens_at_their_positions():
    from kvplug.blend.blender import QUESTION_TOKENS, _question

    tokens, chunks, end = prompt()
    j = job(tokens, chunks, end, 0.5)
    j.tail, j.tail_at = list(range(QUESTION_TOKENS + 40)), end + 7
    tail, at = _question(j)
    assert tail == j.tail[40:] and at == end + 7 + 40
    j.tail, j.tail_at = [4, 5], None
    assert _question(j) == ([4, 5], end)


def test_question_attention_equals_a_plain_softmax_over_the_repeated_heads():
    from kvplug.blend.relevance import question_attention

    g = torch.Generator().manual_seed(2)
    T, S = 5, 17
    q, ks, vs = torch.randn(T, H, D, generator=g), torch.randn(S, KV, D, generator=g), torch.randn(S, KV, D, generator=g)
    ko, vo = torch.randn(T, KV, D, generator=g), torch.randn(T, KV, D, generator=g)
    out, w = question_attention(q, ks, vs, ko, vo, D ** -0.5)
    k = torch.cat([ks, ko]).repeat_interleave(H // KV, 1)
    v = torch.cat([vs, vo]).repeat_interleave(H // KV, 1)
    s = torch.einsum("thd,khd->htk", q, k) * D ** -0.5
    future = torch.arange(S + T)[None, :] > (S + torch.arange(T))[:, None]
    p = s.masked_fill(future[None], float("-inf")).softmax(-1)
    torch.testing.assert_close(out, torch.einsum("htk,khd->thd", p, v).reshape(T, H * D), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, p[..., :S].sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)


# ---- batches -------------------------------------------------------------------------------
def batch_jobs(toys, policy):
    """Three requests over the same chunks in other orders, ratios and engine prefixes, each with
    its own cache slots (its own blocks); the engine holds each one's prefix [0, start)."""
    tokens, chunks, end = prompt()
    store = DictStore()
    warm(Blender(toys[0], store), tokens, chunks)
    jobs = []
    for j, (order, ratio, start) in enumerate([((0, 1, 2, 3), 0.3, 0), ((0, 2, 3, 1), 0.5, 7), ((0, 3, 1, 2), 0.0, 0)]):
        toks, spans, at = [], [], 0
        for c in order:
            b, e, key = chunks[c]
            toks += tokens[b:e]
            spans.append((at, at + e - b, key))
            at += e - b
        toks += [3, 9, 27, 4]
        base = 1000 * (j + 1)
        for toy in toys:  # the engine's own prefill of [0, start), in this request's slots
            ref = toy.reference_kv(toks[:start]) if start else None
            for i in range(L):
                if start:
                    toy.write_kv(i, ref[i, 0], ref[i, 1], torch.arange(base, base + start))
        jobs.append(BlendJob(toks, start, at, spans, torch.arange(base + start, base + at), ratio, policy,
                             tail=toks[at:], prefix_slots=torch.arange(base, base + start), chunk_kv=store.d))
    return jobs


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_batch_of_jobs_writes_what_each_job_writes_alone_bit_for_bit(policy):
    alone, batched = Toy(), Toy()
    jobs = batch_jobs([alone, batched], policy)
    reports = [Blender(alone, None, check_layer=0, head_tokens=2).run(j) for j in jobs]
    together = Blender(batched, None, check_layer=0, head_tokens=2).run_batch(jobs)
    assert [(r.recomputed, r.picked, r.chunk_hits) for r in together] == \
        [(r.recomputed, r.picked, r.chunk_hits) for r in reports]
    assert any(r.recomputed for r in reports) and reports[2].recomputed == 0
    for i in range(L):
        assert alone.cache[i].keys() == batched.cache[i].keys()
        for slot, (k, v) in alone.cache[i].items():
            assert torch.equal(k, batched.cache[i][slot][0]) and torch.equal(v, batched.cache[i][slot][1]), (i, slot)


def test_relevance_budgets_follow_the_question_after_the_heads_and_add_up():
    from kvplug.blend.selection import relevance_budget

    # 30 tokens: 3 reserved heads, the other 27 split 1:2:0 by relevance, no chunk above its size
    assert relevance_budget([20, 40, 10], [0.1, 0.2, 0.0], 30, [0, 2, 1]) == [9, 20, 1]
    assert relevance_budget([5, 40, 10], [0.5, 0.5, 0.0], 30, [0, 0, 0]) == [5, 25, 0]  # capped chunk 0
    assert sum(relevance_budget([9, 9, 9], [1.0, 1.0, 1.0], 10)) == 10  # largest remainders: exactly 10
    assert relevance_budget([9, 9], [0.0, 0.0], 5, [1, 1]) == [1, 1]  # nobody read: the heads only
