"""deviation_topk: every available backend against the torch reference.

Tolerances: scores are fp32 sums of upcast values, so only the summation order differs
between implementations: rtol 1e-5, atol 1e-5 * H * D, for every input dtype.
Top-k is checked by the reference scores of the picked tokens (ties may pick either).
"""
import pytest
import torch

from op_backends import op_backends
from kvplug.ops.deviation_topk import deviation_topk, deviation_topk_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backends():
    return op_backends("deviation_topk")


def device_for(backend):
    # On a CUDA machine every backend, torch's too, runs on CUDA tensors.
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def make(T, H, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(T, H, D, generator=g) for _ in range(4)]
    # cached = fresh + noise of per-token magnitude, so scores spread over decades
    scale = torch.rand(T, 1, 1, generator=g) * 2
    out = [t[0], t[0] + scale * t[1], t[2], t[2] + scale * t[3]]
    return [x.to(dtype=dtype, device=device) for x in out]


def check(got, ref_scores, k, H, D):
    scores, idx = got
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(scores.cpu(), ref_scores.cpu(), rtol=1e-5, atol=1e-5 * H * D)
    kk = max(0, min(k, ref_scores.numel()))
    assert idx.shape == (kk,)
    assert len(set(idx.tolist())) == kk
    want = torch.topk(ref_scores.cpu(), kk).values
    torch.testing.assert_close(ref_scores.cpu()[idx.cpu()], want, rtol=1e-5, atol=1e-5 * H * D)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,D", [(1, 1, 64), (7, 3, 64), (33, 1, 128), (130, 3, 128), (45, 2, 24)])
@pytest.mark.parametrize("with_v", [False, True])
def test_matches_reference(backend, dtype, T, H, D, with_v):
    kf, kc, vf, vc = make(T, H, D, dtype, device_for(backend), seed=T * 7 + H)
    if not with_v:
        vf = vc = None
    ref_scores, _ = deviation_topk_ref(kf, kc, T, vf, vc)
    for k in (0, 1, max(1, T // 3), T + 5):
        check(deviation_topk(kf, kc, k, vf, vc, backend=backend), ref_scores, k, H, D)


@pytest.mark.parametrize("backend", backends())
def test_token_strided_and_noncontiguous(backend):
    dev = device_for(backend)
    kf, kc, vf, vc = make(66, 3, 64, torch.float16, dev, seed=5)
    kf, vc = kf[::2], vc[::2]  # token stride 2*H*D: read in place
    kc, vf = kc[1::2].transpose(1, 2).contiguous().transpose(1, 2), vf[1::2]  # [H, D] not dense
    ref_scores, _ = deviation_topk_ref(kf, kc, 4, vf, vc)
    check(deviation_topk(kf, kc, 4, vf, vc, backend=backend), ref_scores, 4, 3, 64)


def test_reference_semantics_by_hand():
    kf = torch.randn(5, 2, 3)
    kc = kf.clone()
    kc[3] += 2.0  # 6 elements * 4 = 24
    kc[1, 0, 0] += 1.0
    scores, idx = deviation_topk_ref(kf, kc, 2)
    torch.testing.assert_close(scores, torch.tensor([0.0, 1.0, 0.0, 24.0, 0.0]), rtol=1e-5, atol=1e-5)
    assert idx.tolist() == [3, 1]


def test_empty_tokens():
    kf = torch.randn(0, 2, 64)
    scores, idx = deviation_topk(kf, kf.clone(), 3, backend="torch")
    assert scores.shape == (0,) and idx.shape == (0,)


def test_bad_inputs_raise_value_error():
    kf = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        deviation_topk(kf, torch.randn(4, 2), 1)
    with pytest.raises(ValueError, match="both"):
        deviation_topk(kf, kf, 1, v_fresh=kf)
    with pytest.raises(ValueError, match="int64"):
        deviation_topk(kf.long(), kf.long(), 1)


def test_fake_impl_under_compile():
    kf = torch.randn(9, 2, 16)
    kc = kf + 0.1 * torch.randn(9, 2, 16)
    fn = torch.compile(lambda a, b: deviation_topk(a, b, 4, backend="torch"), fullgraph=True, backend="eager")
    scores, idx = fn(kf, kc)
    check((scores, idx), deviation_topk_ref(kf, kc, 4)[0], 4, 2, 16)
