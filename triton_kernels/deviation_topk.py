"""Triton: fused per-token KV deviation score (one read of K and V, fp32 accumulate).

Functions:
    deviation_score(k_fresh, k_cached, v_fresh, v_cached)  fp32 [T] scores (V may be None)
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _deviation_score_kernel(kf, kc, vf, vc, out, T, F, s_kf, s_kc, s_vf, s_vc,
                            HAS_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    # One program owns BLOCK_T tokens and walks their dense H*D rows; every input
    # byte is read once, which is what makes the op bandwidth-bound.
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rmask = rows < T
    acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        m = rmask[:, None] & (cols < F)[None, :]
        a = tl.load(kf + rows[:, None] * s_kf + cols[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(kc + rows[:, None] * s_kc + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += (a - b) * (a - b)
        if HAS_V:
            a = tl.load(vf + rows[:, None] * s_vf + cols[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(vc + rows[:, None] * s_vc + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += (a - b) * (a - b)
    tl.store(out + rows, tl.sum(acc, axis=1), mask=rmask)


def _check(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"deviation_score: {name} {tuple(t.shape)} {t.dtype} does not match "
                         f"{tuple(like.shape)} {like.dtype}")
    if t.dim() != 3 or not ((t.shape[1] <= 1 or t.stride(1) == t.shape[2]) and (t.shape[2] <= 1 or t.stride(2) == 1)):
        raise ValueError(f"deviation_score: {name} shape {tuple(t.shape)} strides {t.stride()}: "
                         "each token's [H, D] must be dense")


def deviation_score(k_fresh, k_cached, v_fresh=None, v_cached=None) -> torch.Tensor:
    """Scores fp32 [T]; inputs [T, H, D] with dense [H, D] rows (any token stride)."""
    _check("k_fresh", k_fresh, k_fresh)
    _check("k_cached", k_cached, k_fresh)
    has_v = v_fresh is not None
    if has_v:
        _check("v_fresh", v_fresh, k_fresh)
        _check("v_cached", v_cached, k_fresh)
    else:
        v_fresh, v_cached = k_fresh, k_cached  # never read: HAS_V is a constexpr
    T, H, D = k_fresh.shape
    out = torch.empty((T,), dtype=torch.float32, device=k_fresh.device)
    if T == 0:
        return out
    F = H * D
    block_f = min(triton.next_power_of_2(F), 512)
    block_t = max(1, min(16, 4096 // block_f))
    grid = (triton.cdiv(T, block_t),)
    _deviation_score_kernel[grid](
        k_fresh, k_cached, v_fresh, v_cached, out, T, F,
        k_fresh.stride(0), k_cached.stride(0), v_fresh.stride(0), v_cached.stride(0),
        HAS_V=has_v, BLOCK_T=block_t, BLOCK_F=block_f)
    return out
