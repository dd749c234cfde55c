"""Layers that differ (Gemma 3's kind): a toy whose layers 0 and 2 have a sliding window and one
RoPE base, and layer 1 full attention and another base. The blender, over it, against a plain
reference forward that masks each layer to its own window: ratio 1 = the full prefill, ratio 0 =
each chunk's KV with its keys re-rotated per layer with that layer's RoPE, the question's
attention only within each layer's window.
"""
import pytest
import torch

from kvplug.blend.layer_kinds import LayerKinds, window_mask
from kvplug.blend.policies import POLICIES
from kvplug.blend.relevance import question_attention
from kvplug.ops.rope import rerotate_keys_ref, rope_inv_freq
from test_blender import D, H, KV, L, Blender, DictStore, Toy, job, prompt, question_pass, rotate, warm

WINDOWS = [6, None, 6]  # the prompt's chunks are 7..25 tokens: most keys are out of a window


class WindowedToy(Toy):
    """Toy with per-layer RoPE (base 100 on windowed layers, 10000 on the global one) and windows."""

    def __init__(self, seed=0):
        super().__init__(seed)
        local, full = rope_inv_freq(D, 100.0), rope_inv_freq(D, 10000.0)
        self.ropes = [local if w else full for w in WINDOWS]

    def rope_for(self, i):
        return self.ropes[i], "neox"

    def window(self, i):
        return WINDOWS[i]

    def _qkv(self, i, x, pos):
        h = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        w = self.w[i]
        q = rotate((h @ w["q"]).view(-1, H, D), pos, self.ropes[i])
        k = rotate((h @ w["k"]).view(-1, KV, D), pos, self.ropes[i])
        return q, k, (h @ w["v"]).view(-1, KV, D)

    def reference_kv(self, tokens):
        n = len(tokens)
        pos = torch.arange(n)
        x, out = self.emb[torch.tensor(tokens)], []
        for i in range(L):
            q, k, v = self._qkv(i, x, pos)
            out.append(torch.stack([k, v]))
            d = pos[:, None] - pos[None, :]
            seen = (d >= 0) & (d < (WINDOWS[i] or n + 1))
            kk, vv = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
            p = (torch.einsum("qhd,khd->hqk", q, kk) * self.scale).masked_fill(~seen, float("-inf")).softmax(-1)
            x = x + torch.einsum("hqk,khd->qhd", p, vv).reshape(n, H * D) @ self.w[i]["o"]
        return torch.stack(out)


def concat_reference(toy, tokens, chunks, end):
    pieces = []
    for b, e, _ in chunks:
        kv = toy.reference_kv(tokens[b:e])
        for i in range(L):
            kv[i, 0] = rerotate_keys_ref(kv[i, 0], torch.arange(e - b), torch.arange(b, e), toy.ropes[i], "neox")
        pieces.append(kv)
    return torch.cat(pieces, 2)[:, :, :end]


def test_rerotate_moves_each_layer_with_its_own_rope_in_one_call_per_group():
    g = torch.Generator().manual_seed(0)
    ropes = [rope_inv_freq(D, b) for b in (10.0, 1e4, 10.0, 10.0, 1e4)]  # {0, 2, 3}: gathered; {1, 4}: a view
    kinds = LayerKinds([(r, "neox") for r in ropes], [4, None, 4, 4, None])
    assert [layers for layers, _, _ in kinds.groups] == [[0, 2, 3], [1, 4]]
    kv = torch.randn(5, 2, 9, KV, D, generator=g)
    old, new = torch.arange(9), torch.arange(30, 39)
    want = torch.stack([rerotate_keys_ref(kv[i, 0], old, new, ropes[i], "neox") for i in range(5)])
    kinds.rerotate(kv[:, 0], old, new)  # a strided view: the keys of [L, 2, T, KV, D]
    torch.testing.assert_close(kv[:, 0], want, rtol=1e-5, atol=1e-5)


def test_window_mask_sees_the_last_w_positions_up_to_itself():
    m = window_mask(torch.tensor([5, 9]), torch.arange(10), 3)
    assert m[0].nonzero().flatten().tolist() == [3, 4, 5] and m[1].nonzero().flatten().tolist() == [7, 8, 9]
    assert window_mask(torch.tensor([2]), torch.arange(4), None)[0].tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="window 0"):
        LayerKinds([(rope_inv_freq(D, 10.0), "neox")], [0])


def test_compute_chunk_is_the_windowed_reference_prefill():
    toy = WindowedToy()
    tokens, _, _ = prompt()
    got = Blender(toy, DictStore()).compute_chunk(tokens[:40])
    torch.testing.assert_close(got, toy.reference_kv(tokens[:40]), rtol=1e-5, atol=1e-5)
    assert (toy.reference_kv(tokens[:40]) - Toy().reference_kv(tokens[:40])).abs().max() > 1e-2  # windows matter


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("start", [0, 12])
def test_ratio_one_is_the_windowed_full_prefill(start, policy):
    toy = WindowedToy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore(), head_tokens=3)
    warm(blender, tokens, chunks)
    want = toy.reference_kv(tokens[:end])
    for i in range(L):  # the engine's own prefill of [0, start)
        toy.write_kv(i, want[i, 0, :start], want[i, 1, :start], torch.arange(start))
    report = blender.run(job(tokens, chunks, end, 1.0, start, policy))
    assert report.recomputed == end - start
    torch.testing.assert_close(toy.written_kv(), want[:, :, start:], rtol=1e-4, atol=1e-4)


def test_ratio_zero_is_the_concatenation_rerotated_per_layer():
    toy = WindowedToy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore())
    warm(blender, tokens, chunks)
    assert blender.run(job(tokens, chunks, end, 0.0)).recomputed == 0
    torch.testing.assert_close(toy.written_kv(), concat_reference(toy, tokens, chunks, end), rtol=1e-4, atol=1e-4)


def test_stored_chunks_come_back_with_each_layers_keys_at_zero():
    toy = WindowedToy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore())
    warm(blender, tokens, chunks)
    blender.run(job(tokens, chunks, end, 1.0))
    full = toy.reference_kv(tokens[:end])
    b, e, _ = chunks[2]
    got = blender.read_chunks([(torch.arange(b, e), b)])[0]
    for i in range(L):
        want = rerotate_keys_ref(full[i, 0, b:e], torch.arange(b, e), torch.arange(e - b), toy.ropes[i], "neox")
        torch.testing.assert_close(got[i, 0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("at", [17, 40])
def test_windowed_question_attention_is_a_softmax_over_the_keys_in_its_window(at):
    g = torch.Generator().manual_seed(2)
    T, S, W = 5, 17, 4
    q, ks, vs = torch.randn(T, H, D, generator=g), torch.randn(S, KV, D, generator=g), torch.randn(S, KV, D, generator=g)
    ko, vo = torch.randn(T, KV, D, generator=g), torch.randn(T, KV, D, generator=g)
    out, w = question_attention(q, ks, vs, ko, vo, D ** -0.5, window=W, at=at)
    k = torch.cat([ks, ko]).repeat_interleave(H // KV, 1)
    v = torch.cat([vs, vo]).repeat_interleave(H // KV, 1)
    s = torch.einsum("thd,khd->htk", q, k) * D ** -0.5
    seen = window_mask(torch.arange(at, at + T), torch.cat([torch.arange(S), torch.arange(at, at + T)]), W)
    p = s.masked_fill(~seen[None], float("-inf")).softmax(-1)
    torch.testing.assert_close(out, torch.einsum("htk,khd->thd", p, v).reshape(T, H * D), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, p[..., :S].sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)
    assert w[:max(0, at - W + 1)].abs().max() == 0 if at - W + 1 > 0 else True  # out of every window


def windowed_question_oracle(toy, tail, kv, end, at):
    """The question at positions at.. through the toy, one query and head at a time: softmax over
    the span's keys and its own up to itself, within each layer's window; weights on the span."""
    T = len(tail)
    pos = torch.arange(at, at + T)
    k_pos = torch.cat([torch.arange(end), pos])
    hidden, residual, total = toy.embed(torch.tensor(tail)), None, torch.zeros(end)
    for i in range(L):
        def attend(q, k, v, i=i):
            q, k, v = q.view(T, H, D), k.view(T, KV, D), v.view(T, KV, D)
            keys, vals = torch.cat([kv[i, 0], k]), torch.cat([kv[i, 1], v])
            out = torch.zeros(T, H, D)
            for t in range(T):
                d = pos[t] - k_pos
                seen = ((d >= 0) & (d < (WINDOWS[i] or 10 ** 6))).nonzero().flatten()
                for h in range(H):
                    p = (keys[seen, h // (H // KV)] @ q[t, h] * toy.scale).softmax(0)
                    total.index_add_(0, seen[seen < end], p[seen < end])
                    out[t, h] = p @ vals[seen, h // (H // KV)]
            return out.reshape(T, H * D)
        hidden, residual = toy.forward_layer(i, pos, hidden, residual, attend)
    return total / (L * H * T)


@pytest.mark.parametrize("gap", [0, 3])
def test_the_question_pass_reads_only_what_each_layers_window_reaches(gap):
    toy, g = WindowedToy(seed=4), torch.Generator().manual_seed(6)
    end, tail = 23, [3, 17, 8]
    kv = torch.randn(L, 2, end, KV, D, generator=g)
    got = question_pass(toy, tail, kv, end, 0, at=end + gap)
    torch.testing.assert_close(got, windowed_question_oracle(toy, tail, kv, end, end + gap), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["adaptive", "mixed", "query"])
def test_partial_ratios_pick_within_budget_with_windowed_check_and_question_passes(policy):
    """The check layer (0) is windowed: the question beside the span, the deviation and the
    adaptive budget's outside mass all attend within it; later layers change only picked tokens."""
    toy = WindowedToy()
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore(), check_layer=0, head_tokens=2)
    warm(blender, tokens, chunks)
    fixed = blender.run(job(tokens, chunks, end, 0.3))
    report = blender.run(job(tokens, chunks, end, 0.3, policy=policy))
    assert 0 < report.recomputed <= fixed.recomputed == round(0.3 * end)
    written, concat = toy.written_kv(), concat_reference(toy, tokens, chunks, end)
    changed = ((written[2] - concat[2]).abs().amax(dim=(0, 2, 3)) > 1e-4).nonzero().flatten().tolist()
    assert set(changed) <= set(report.picked)


def test_a_fused_rerotating_write_is_not_used_when_layers_differ_in_rope():
    """The GPU path's write_rerotated knows one RoPE: with two, the blender re-rotates per group
    and writes plainly, and the result is still the per-layer re-rotated concatenation."""
    toy = WindowedToy()

    def fused(*args, **kwargs):
        raise AssertionError("write_rerotated applies one RoPE to every layer")
    toy.write_rerotated = fused
    tokens, chunks, end = prompt()
    blender = Blender(toy, DictStore())
    warm(blender, tokens, chunks)
    blender.run(job(tokens, chunks, end, 0.0))
    torch.testing.assert_close(toy.written_kv(), concat_reference(toy, tokens, chunks, end), rtol=1e-4, atol=1e-4)
