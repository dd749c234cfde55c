"""kmeans_step / kmeans_keys: every available backend against the torch reference.

Tolerances (all input dtypes; keys are upcast to fp32 exactly, so only summation order
differs): an assignment may differ from the reference only where the two centroids' fp64
distances are within 1e-4 * (|x|^2 + |c|^2); new centroids must equal the member means of
the kernel's own assignment within rtol 1e-5 / atol 1e-5; sizes exactly.
"""
import pytest
import torch

from op_backends import op_backends
from kvplug.ops.kmeans import (kmeans_init, kmeans_keys, kmeans_step, kmeans_step_ref,
                               update_ref)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 64, 1), (7, 3, 64, 5), (33, 1, 128, 16), (130, 3, 64, 5), (130, 1, 128, 16), (45, 2, 24, 5)]


def kmeans_inertia(keys: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """fp32 [H]: sum over tokens of ||keys[t, h] - centroids[h, assign[h, t]]||^2."""
    x = keys.float().transpose(0, 1)
    picked = torch.gather(centroids.float(), 1, assign.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    return (x - picked).square().sum(dim=(1, 2))


def backends():
    return op_backends("kmeans_step")


def device_for(backend):
    # On a CUDA machine every backend, torch's too, runs on CUDA tensors.
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def make_keys(T, H, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(4, H, D, generator=g)  # some cluster structure, not just noise
    keys = centres[torch.randint(4, (T,), generator=g)] + torch.randn(T, H, D, generator=g)
    return keys.to(dtype=dtype, device=device)


def dist64(keys, centroids, assign):
    x = keys.double().transpose(0, 1)
    c = torch.gather(centroids.double(), 1, assign.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    return (x - c).square().sum(-1)


def check_step(keys, cen, got):
    new, assign, sizes = (t.cpu() for t in got)
    keys, cen = keys.cpu(), cen.cpu()
    ref_new, ref_assign, ref_sizes = kmeans_step_ref(keys, cen)
    H, T, _ = keys.transpose(0, 1).shape
    assert new.dtype == torch.float32 and assign.dtype == torch.int64 and sizes.dtype == torch.int64
    assert new.shape == ref_new.shape and assign.shape == (H, T) and sizes.shape == ref_sizes.shape
    diff = assign != ref_assign
    if diff.any():
        scale = keys.double().transpose(0, 1).square().sum(-1) + cen.double().square().sum(-1).max(1).values[:, None]
        gap = (dist64(keys, cen, assign) - dist64(keys, cen, ref_assign)).abs()
        assert (gap[diff] <= 1e-4 * scale[diff]).all(), "assignment differs beyond a near-tie"
    want_new, _, want_sizes = update_ref(keys.float().transpose(0, 1), cen.float(), assign)
    assert torch.equal(sizes, want_sizes)
    torch.testing.assert_close(new, want_new, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,D,C", SHAPES)
def test_step_matches_reference(backend, dtype, T, H, D, C):
    dev = device_for(backend)
    keys = make_keys(T, H, D, dtype, dev, seed=T + 13 * C)
    cen = kmeans_init(keys, C, seed=1, init="random") + 0.1  # +0.1: no key sits exactly on a centroid
    check_step(keys, cen, kmeans_step(keys, cen, backend=backend))


@pytest.mark.parametrize("backend", backends())
def test_step_token_strided_keys_and_empty_cluster(backend):
    dev = device_for(backend)
    base = make_keys(66, 3, 64, torch.bfloat16, dev, seed=3)
    keys = base[::2]  # token stride 2*H*D, read in place
    cen = kmeans_init(keys, 5, seed=2, init="random")
    cen[:, 4] = 1e4  # nothing is near: empty cluster keeps its centroid
    new, assign, sizes = kmeans_step(keys, cen, backend=backend)
    assert (sizes[:, 4] == 0).all() and torch.equal(new[:, 4].cpu(), cen[:, 4].cpu())
    check_step(keys, cen, (new, assign, sizes))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_keys_deterministic_and_inertia_non_increasing(backend, init):
    keys = make_keys(130, 3, 64, torch.float16, device_for(backend), seed=7)
    a = kmeans_keys(keys, 16, iters=3, seed=11, init=init, backend=backend)
    b = kmeans_keys(keys, 16, iters=3, seed=11, init=init, backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], kmeans_keys(keys, 16, iters=3, seed=12, init=init, backend=backend)[0])
    previous = None
    for iters in range(0, 5):
        cen, assign, sizes = kmeans_keys(keys, 16, iters=iters, seed=11, init=init, backend=backend)
        assert torch.equal(sizes.sum(1).cpu(), torch.full((3,), 130))
        inertia = kmeans_inertia(keys, cen, assign).cpu()
        if previous is not None:
            assert (inertia <= previous * (1 + 1e-5)).all(), (iters, inertia, previous)
        previous = inertia


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_init_picks_keys(init):
    keys = make_keys(33, 3, 64, torch.float32, "cpu", seed=1)
    cen = kmeans_init(keys, 5, seed=0, init=init)
    assert cen.shape == (3, 5, 64) and cen.dtype == torch.float32
    x = keys.transpose(0, 1)
    for h in range(3):
        hits = (cen[h][:, None, :] == x[h][None, :, :]).all(-1).any(-1)
        assert hits.all(), "every initial centroid is one of the keys"
    assert kmeans_init(keys, 40, seed=0, init=init).shape == (3, 40, 64)  # C > T repeats keys


def test_duplicate_keys_kmeans_pp_does_not_fail():
    keys = torch.randn(1, 2, 64).expand(9, 2, 64).contiguous()
    cen, assign, sizes = kmeans_keys(keys, 3, iters=2, seed=0, backend="torch")
    assert sizes.sum().item() == 18 and torch.isfinite(cen).all()


def test_bad_inputs_raise_value_error():
    keys = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="init"):
        kmeans_keys(keys, 2, init="bogus")
    with pytest.raises(ValueError, match=r"\(2, 3, 15\)"):
        kmeans_step(keys, torch.randn(2, 3, 15))
    with pytest.raises(ValueError, match=r"\(8, 16\)"):
        kmeans_step(torch.randn(8, 16), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans_init(keys, 0, seed=0)


def test_fake_impl_under_compile():
    keys = make_keys(20, 2, 16, torch.float32, "cpu")
    cen = kmeans_init(keys, 3, seed=0, init="random") + 0.1
    fn = torch.compile(lambda k, c: kmeans_step(k, c, backend="torch"), fullgraph=True, backend="eager")
    check_step(keys, cen, fn(keys, cen))


@pytest.mark.parametrize("backend", backends())
def test_single_head_with_odd_head_stride(backend):
    # [T, 1, D] view whose size-1 head dim has a large stride: .contiguous() is a no-op,
    # so the kernels must accept it as dense rows
    keys = make_keys(9, 2, 64, torch.float32, device_for(backend)).transpose(0, 1).contiguous().transpose(0, 1)[:, :1]
    assert keys.is_contiguous() and keys.stride(1) != 64
    cen = kmeans_init(keys, 3, seed=0, init="random") + 0.1
    check_step(keys, cen, kmeans_step(keys, cen, backend=backend))
