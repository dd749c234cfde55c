"""Key clusters of stored chunks and the clustered relevance pass, against the exact pass."""
import pytest
import torch

from kvplug.blend import clusters as kc
from kvplug.blend.layer_kinds import LayerKinds
from kvplug.blend.relevance import question_attention
from kvplug.ops.rope import rerotate_keys_ref, rope_inv_freq
from test_blender import KV, D, H, Blender, DictStore, job, planted, question_pass, warm

G = torch.Generator().manual_seed(7)


def chunk_kv(n, layers=2):
    return torch.randn(layers, 2, n, KV, D, generator=G)


def test_sidecar_round_trips_and_its_size_is_what_the_scheduler_charges():
    c = kc.cluster_chunk(chunk_kv(37), tokens_per_cluster=8)
    data = kc.pack(c)
    assert data.numel() == kc.sidecar_bytes(2, KV, D, 37, 8, 4)
    back = kc.unpack(data, 2, KV, D, 37, 8, torch.float32)
    for a, b in zip((c.centroids, c.values, c.log_size, c.assign), (back.centroids, back.values, back.log_size,
                                                                     back.assign)):
        assert torch.equal(a, b)
    assert c.centroids.shape == (2, KV, 5, D) and int(c.log_size.exp().sum()) == 2 * KV * 37
    with pytest.raises(ValueError, match="sidecar"):
        kc.unpack(data[:-1], 2, KV, D, 37, 8, torch.float32)


def test_centroids_move_with_the_chunk_exactly():
    """RoPE turns every member of a moved chunk by the same angle: the stored centroid, re-rotated,
    is the mean of the members' keys at their new positions."""
    kv = chunk_kv(24)
    inv = rope_inv_freq(D, 100.0)
    c = kc.cluster_chunk(kv, 4)
    span = kc.SpanClusters.build([(50, c)], 74, LayerKinds([(inv, "neox")] * 2, [None] * 2))
    moved = rerotate_keys_ref(kv[:, 0], torch.arange(24), torch.arange(50, 74), inv, "neox")  # [L, n, KV, D]
    for layer in range(2):
        for g in range(KV):
            for cl in range(c.centroids.shape[2]):
                members = (c.assign[layer, g] == cl).nonzero().flatten()
                if members.numel():
                    want = moved[layer, members, g].mean(0)
                    torch.testing.assert_close(span.centroids[layer, g, cl], want, rtol=1e-4, atol=1e-4)
                    assert set(span.positions[span.assign[layer, g] == cl].tolist()) == set((members + 50).tolist())
    assert span.exact.tolist() == list(range(50))  # positions before the chunk stay exact


def test_one_token_per_cluster_and_every_cluster_expanded_is_the_exact_attention():
    n, T = 20, 4
    kv = chunk_kv(n, layers=1)
    q = torch.randn(T, H, D, generator=G)
    ko, vo = torch.randn(T, KV, D, generator=G), torch.randn(T, KV, D, generator=G)
    c = kc.cluster_chunk(kv, 1)
    span = kc.SpanClusters.build([(0, c)], n, LayerKinds([(rope_inv_freq(D, 100.0), "neox")], [None]))  # at 0: nothing rotates
    out, w = kc.clustered_attention(q, 0, span, kv[0], ko, vo, D ** -0.5, top=n)
    want_out, want_w = question_attention(q, kv[0, 0], kv[0, 1], ko, vo, D ** -0.5)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w, want_w, rtol=1e-4, atol=1e-4)


def test_the_cluster_path_finds_the_exact_paths_top_token_on_a_planted_case():
    toy, tokens, chunks, end, marker, _ = planted()
    blender = Blender(toy, DictStore(), cluster_tokens=4, cluster_min_tokens=1, cluster_top=2)
    warm(blender, tokens, chunks)
    work = blender._gather(job(tokens, chunks, end, 0.1))
    kv = blender._rotated(work.span, work.moves)  # the span starts at 0: no engine prefix
    tail = tokens[end:end + 4]
    exact = question_pass(toy, tail, kv, end, 0)
    clusters = {key: kc.cluster_chunk(blender.store.get(key), 4) for _, _, key in chunks}
    span = kc.SpanClusters.build([(b, clusters[key]) for b, _, key in chunks], end, blender.kinds)
    approx = question_pass(toy, tail, kv, end, 0, span, top=2)
    assert int(exact.argmax()) == marker == int(approx.argmax())
    k = max(1, round(0.1 * exact.numel()))  # recall of exact's top 10% among approx's
    assert len(set(exact.topk(k).indices.tolist()) & set(approx.topk(k).indices.tolist())) / k >= 0.5


def test_blender_with_clusters_keeps_ratio_one_exact_and_picks_the_planted_token():
    toy, tokens, chunks, end, marker, _ = planted()
    store = DictStore()
    blender = Blender(toy, store, cluster_tokens=4, cluster_min_tokens=1, cluster_top=2)
    warm(blender, tokens, chunks)
    clusters = {key: kc.cluster_chunk(store.get(key), 4) for _, _, key in chunks}
    j = job(tokens, chunks, end, 1 / end, policy="query")
    j.chunk_clusters = clusters
    assert blender.run(j).picked == [marker]
    full = job(tokens, chunks, end, 1.0, policy="query")
    full.chunk_clusters = clusters
    blender.run(full)
    torch.testing.assert_close(toy.written_kv(), toy.reference_kv(tokens[:end]), rtol=1e-4, atol=1e-4)
