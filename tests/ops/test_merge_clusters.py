"""merge_clusters: every available backend against the torch reference, and the identity that
justifies the log-size bias (attend_merged over the merge equals full attention over the copies).

Tolerances: means are summed in fp32 and rounded once to the input dtype, so results may
differ from the reference by the last rounding step: fp32 rtol 1e-5 / atol 1e-6, fp16
rtol 1e-3 / atol 1e-5, bf16 rtol 8e-3 / atol 1e-5. log_size must match exactly.
Attention identity: inputs hold duplicated keys, whose merged means are exact in bf16/fp16
and within an ulp in fp32: attend_merged_ref's out and lse within rtol 1e-5 / atol 1e-5.
Through attend_merged on the backend under test, out gets atol 1e-5 + 2u * max|v| (u the
merged values' unit roundoff, bf16 2^-8, fp16 2^-11, 0 for fp32), since its Triton path
rounds the softmax weights to the values' dtype once; lse stays within 1e-5.
"""
import pytest
import torch

from op_backends import op_backends
from kvplug.ops import _backend
from kvplug.ops.attend_merged import attend_merged, attend_merged_ref
from kvplug.ops.kmeans import kmeans_keys
from kvplug.ops.merge_clusters import merge_clusters, merge_clusters_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5)}
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
SHAPES = [(1, 1, 64, 1), (7, 3, 64, 5), (33, 1, 128, 16), (130, 3, 64, 5), (130, 1, 128, 16), (45, 2, 24, 7)]


def backends():
    return op_backends("merge_clusters")


def device_for(backend):
    # On a CUDA machine every backend, torch's too, runs on CUDA tensors.
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def attend_full(q, keys, values):
    """fp32 (softmax(q.k/sqrt(D)) @ v, logsumexp(q.k/sqrt(D))) over all T tokens, GQA like attend_merged."""
    g = q.shape[1] // keys.shape[1]
    k = keys.float().transpose(0, 1).repeat_interleave(g, dim=0)
    v = values.float().transpose(0, 1).repeat_interleave(g, dim=0)
    logits = torch.einsum("qhd,htd->qht", q.float(), k) / q.shape[2] ** 0.5
    return torch.einsum("qht,htd->qhd", torch.softmax(logits, dim=-1), v), torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,D,C", SHAPES)
def test_matches_reference(backend, dtype, T, H, D, C):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(T * 3 + C)
    keys = torch.randn(T, H, D, generator=g).to(dtype=dtype, device=dev)
    values = torch.randn(T, H, D, generator=g).to(dtype=dtype, device=dev)
    assign = torch.randint(C, (H, T), generator=g).to(dev)
    got = merge_clusters(keys, values, assign, C, backend=backend)
    want = merge_clusters_ref(keys.cpu(), values.cpu(), assign.cpu(), C)
    rtol, atol = TOL[dtype]
    for x, y in zip(got[:2], want[:2]):
        assert x.dtype == dtype and x.shape == (H, C, D)
        torch.testing.assert_close(x.cpu(), y, rtol=rtol, atol=atol)
    assert got[2].dtype == torch.float32 and torch.equal(got[2].cpu(), want[2])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,H", [(1, 1), (3, 3), (6, 3)])
def test_merged_attention_equals_full_attention_over_duplicates(backend, dtype, Hq, H):
    dev, D, C = device_for(backend), 64, 6
    g = torch.Generator().manual_seed(Hq + H)
    counts = torch.tensor([1, 3, 0, 5, 2, 4])  # cluster 2 is empty: -inf, zero weight
    T = int(counts.sum())
    uk, uv = torch.randn(C, H, D, generator=g), torch.randn(C, H, D, generator=g)
    base = torch.repeat_interleave(torch.arange(C), counts)  # [T] cluster of each copy
    assign = torch.stack([base[torch.randperm(T, generator=g)] for _ in range(H)])  # own order per head
    heads = torch.arange(H)[None, :]
    keys = uk[assign.T, heads].to(dtype)  # keys[t, h] = uk[assign[h, t], h]
    values = uv[assign.T, heads].to(dtype)
    q = torch.randn(4, Hq, D, generator=g)
    mk, mv, log_size = merge_clusters(keys.to(dev), values.to(dev), assign.to(dev), C, backend=backend)
    assert torch.equal(log_size.cpu(), torch.log(counts.float()).expand(H, C))
    assert torch.isneginf(log_size[:, 2]).all() and (mk[:, 2] == 0).all() and (mv[:, 2] == 0).all()
    want_out, want_lse = attend_full(q, keys, values)
    ref_out, ref_lse = attend_merged_ref(q, mk.cpu(), mv.cpu(), log_size.cpu())
    torch.testing.assert_close(ref_out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_lse, want_lse, rtol=1e-5, atol=1e-5)
    # the same identity through the op, on the backend's own path (cuda: whatever auto runs
    # when kvplug._C has no attend_merged)
    attend_backend = "auto" if backend == "cuda" and not _backend.has_cuda_op("attend_merged") else backend
    out, lse = attend_merged(q.to(dev), mk, mv, log_size, backend=attend_backend)
    atol = 1e-5 + 2 * UNIT_ROUNDOFF[dtype] * float(uv.abs().max())
    torch.testing.assert_close(out.cpu(), want_out, rtol=1e-5, atol=atol)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_merge_of_kmeans_partition_gives_its_centroids(backend):
    dev = device_for(backend)
    keys = torch.randn(130, 3, 64, device=dev)
    values = torch.randn(130, 3, 64, device=dev)
    cen, assign, sizes = kmeans_keys(keys, 5, iters=2, seed=0, backend=backend)
    mk, _, log_size = merge_clusters(keys, values, assign, 5, backend=backend)
    full = sizes > 0
    torch.testing.assert_close(mk[full].cpu(), cen[full].cpu(), rtol=1e-5, atol=1e-6)
    assert torch.equal(log_size.cpu(), torch.log(sizes.float()).cpu())


@pytest.mark.parametrize("backend", backends())
def test_strided_inputs(backend):
    dev = device_for(backend)
    kv = torch.randn(33, 2, 3, 64, device=dev, dtype=torch.float16)
    keys, values = kv[:, 0], kv[:, 1]  # token stride 2*H*D, read in place
    values = values.transpose(1, 2).contiguous().transpose(1, 2)  # [H, D] not dense
    assign = torch.randint(5, (33, 3), device=dev).T  # not contiguous
    got = merge_clusters(keys, values, assign, 5, backend=backend)
    want = merge_clusters_ref(keys.cpu(), values.cpu(), assign.cpu(), 5)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-3, atol=1e-5)


def test_bad_inputs_raise_value_error():
    k = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match=r"\(8, 2\)"):
        merge_clusters(k, k, torch.zeros(8, 2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"\(8, 2, 8\)"):
        merge_clusters(k, torch.randn(8, 2, 8), torch.zeros(2, 8, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="n_clusters"):
        merge_clusters(k, k, torch.zeros(2, 8, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match=r"\(2, 5, 4\)"):
        attend_merged_ref(torch.randn(1, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.zeros(2, 5))


def test_fake_impl_under_compile():
    k, v = torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    a = torch.randint(4, (2, 9))
    fn = torch.compile(lambda x, y, z: merge_clusters(x, y, z, 4, backend="torch"), fullgraph=True, backend="eager")
    for x, y in zip(fn(k, v, a), merge_clusters_ref(k, v, a, 4)):
        torch.testing.assert_close(x, y)
