"""centroid_topk: every available backend against the torch reference.

Tolerances: fp32 dot products of upcast values, only the summation order differs:
rtol 1e-5, atol 1e-5 (scores are O(1) after the 1/sqrt(D) scale), for all input dtypes.
Top-k is compared by the reference scores of the picked centroids (ties may pick either).
"""
import pytest
import torch

from op_backends import op_backends
from kvplug.ops.centroid_topk import centroid_topk, centroid_topk_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (Q, Hq, Hkv, D, C)
SHAPES = [(1, 1, 1, 64, 1), (7, 3, 3, 64, 5), (5, 6, 3, 128, 16), (33, 4, 1, 64, 40), (2, 32, 8, 128, 130),
          (3, 2, 2, 24, 7)]


def backends():
    return op_backends("centroid_topk")


def device_for(backend):
    # On a CUDA machine every backend, torch's too, runs on CUDA tensors.
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def full_scores(q, c):
    """All scores, fp64, computed independently of the op under test."""
    group = q.shape[1] // c.shape[0]
    cc = c.double().repeat_interleave(group, dim=0)
    return torch.einsum("qhd,hcd->qhc", q.double(), cc) / q.shape[2] ** 0.5


def check(q, c, k, got):
    scores, idx = (t.cpu() for t in got)
    full = full_scores(q.cpu(), c.cpu()).float()
    kk = max(0, min(k, c.shape[1]))
    assert scores.shape == idx.shape == (q.shape[0], q.shape[1], kk)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    want = torch.topk(full, kk, dim=-1).values
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.gather(full, 2, idx), want, rtol=1e-5, atol=1e-5)
    if kk > 1:
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "indices distinct per (query, head)"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Q,Hq,Hkv,D,C", SHAPES)
def test_matches_reference(backend, dtype, Q, Hq, Hkv, D, C):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(Q * 31 + C)
    q = torch.randn(Q, Hq, D, generator=g).to(dtype=dtype, device=dev)
    c = torch.randn(Hkv, C, D, generator=g).to(device=dev)  # fp32 centroids, as kmeans makes them
    for k in (0, 1, 4, C + 3):
        check(q, c, k, centroid_topk(q, c, k, backend=backend))
    c_same = c.to(dtype)
    check(q, c_same, 3, centroid_topk(q, c_same, 3, backend=backend))


@pytest.mark.parametrize("backend", backends())
def test_strided_queries(backend):
    dev = device_for(backend)
    qkv = torch.randn(9, 3 * 4, 64, device=dev, dtype=torch.float16)
    q = qkv[:, :4]  # a view into a fused qkv tensor: head and token strides not dense
    c = torch.randn(2, 11, 64, device=dev).transpose(0, 1).contiguous().transpose(0, 1)  # dense again
    check(q, c, 5, centroid_topk(q, c, 5, backend=backend))
    q_t = torch.randn(9, 64, 4, device=dev).transpose(1, 2)  # D not unit stride: copied
    check(q_t, c, 5, centroid_topk(q_t, c, 5, backend=backend))


def test_reference_by_hand():
    q = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])  # Q=1, Hq=2, D=4
    c = torch.tensor([[[2.0, 0, 0, 0], [0, 4.0, 0, 0], [-1.0, 0, 0, 0]]])  # Hkv=1, C=3
    scores, idx = centroid_topk_ref(q, c, 2)
    assert idx.tolist() == [[[0, 1], [1, 0]]]
    torch.testing.assert_close(scores, torch.tensor([[[1.0, 0.0], [2.0, 0.0]]]))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match=r"\(2, 6, 16\).*\(4, 3, 16\)"):
        centroid_topk(torch.randn(2, 6, 16), torch.randn(4, 3, 16), 1)
    with pytest.raises(ValueError, match="head dims"):
        centroid_topk(torch.randn(2, 4, 16), torch.randn(2, 3, 8), 1)
    with pytest.raises(ValueError, match=r"\(2, 16\)"):
        centroid_topk(torch.randn(2, 16), torch.randn(2, 3, 16), 1)


def test_fake_impl_under_compile():
    q, c = torch.randn(3, 4, 16), torch.randn(2, 5, 16)
    fn = torch.compile(lambda a, b: centroid_topk(a, b, 2, backend="torch"), fullgraph=True, backend="eager")
    check(q, c, 2, fn(q, c))
