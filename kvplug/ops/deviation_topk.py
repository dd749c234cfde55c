"""KV deviation score + top-k: which tokens' cached KV drifted most from fresh KV.

CacheBlend runs its check layer on all tokens, compares the freshly computed K (and V)
with the cached ones, and recomputes only the tokens that deviate most.

Functions:
    deviation_topk_ref(k_fresh, k_cached, k, v_fresh, v_cached)  torch spec (fp32 math)
    deviation_topk(k_fresh, k_cached, k, v_fresh, v_cached, backend)  dispatcher (cuda -> triton -> torch)
"""
from typing import Optional

import torch

from kvplug.ops import _backend

OP = "deviation_topk"


def deviation_topk_ref(
    k_fresh: torch.Tensor,
    k_cached: torch.Tensor,
    k: int,
    v_fresh: Optional[torch.Tensor] = None,
    v_cached: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token squared deviation and the indices of the k largest.

    Inputs: k_fresh, k_cached [T, H, D] of one dtype (fp16/bf16/fp32), same device;
    v_fresh, v_cached both given ([T, H, D]) or both None.
    scores[t] = sum_{h,d} (k_fresh - k_cached)^2 (+ the same for V), computed in fp32.
    Returns (scores fp32 [T], indices int64 [min(max(k, 0), T)]) with indices ordered by
    descending score (ties in any order).
    """
    _check_inputs(k_fresh, k_cached, v_fresh, v_cached)
    scores = (k_fresh.float() - k_cached.float()).square().sum(dim=(1, 2))
    if v_fresh is not None:
        scores = scores + (v_fresh.float() - v_cached.float()).square().sum(dim=(1, 2))
    return scores, torch.topk(scores, clamp_k(k, scores.shape[0])).indices


def clamp_k(k: int, n: int) -> int:
    return max(0, min(int(k), n))


def _check_inputs(k_fresh, k_cached, v_fresh, v_cached) -> None:
    """ValueError naming the shape or dtype that does not fit [T, H, D] x 2 (x 2)."""
    if (v_fresh is None) != (v_cached is None):
        raise ValueError("deviation_topk: give both v_fresh and v_cached, or neither")
    given = [("k_fresh", k_fresh), ("k_cached", k_cached)]
    if v_fresh is not None:
        given += [("v_fresh", v_fresh), ("v_cached", v_cached)]
    for name, t in given:
        if t.dim() != 3:
            raise ValueError(f"deviation_topk: {name} must be [T, H, D], got shape {tuple(t.shape)}")
        if t.shape != k_fresh.shape or t.dtype != k_fresh.dtype or t.device != k_fresh.device:
            raise ValueError(
                f"deviation_topk: {name} {tuple(t.shape)} {t.dtype} {t.device} does not match "
                f"k_fresh {tuple(k_fresh.shape)} {k_fresh.dtype} {k_fresh.device}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"deviation_topk: {name} dtype {t.dtype} is not fp16/bf16/fp32")


def _rows_dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Kernels read each token as one dense H*D row; any token stride is fine."""
    # strides of size-1 dims are free (and .contiguous() keeps them): ignore those
    if t is None or ((t.shape[1] <= 1 or t.stride(1) == t.shape[2]) and (t.shape[2] <= 1 or t.stride(2) == 1)):
        return t
    return t.contiguous()


@torch.library.custom_op("kvplug::deviation_topk", mutates_args=())
def _deviation_topk_op(
    k_fresh: torch.Tensor,
    k_cached: torch.Tensor,
    k: int,
    v_fresh: Optional[torch.Tensor],
    v_cached: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _backend.choose(OP, k_fresh.device, backend)
    if impl == "torch":
        return deviation_topk_ref(k_fresh, k_cached, k, v_fresh, v_cached)
    args = [_rows_dense(t) for t in (k_fresh, k_cached, v_fresh, v_cached)]
    if impl == "cuda":
        return _backend.cuda_ops().deviation_topk(args[0], args[1], k, args[2], args[3])
    from kvplug._triton.deviation_topk import deviation_score

    scores = deviation_score(*args)
    return scores, torch.topk(scores, clamp_k(k, scores.shape[0])).indices


@_deviation_topk_op.register_fake
def _(k_fresh, k_cached, k, v_fresh, v_cached, backend):
    n = k_fresh.shape[0]
    return (k_fresh.new_empty((n,), dtype=torch.float32),
            k_fresh.new_empty((clamp_k(k, n),), dtype=torch.int64))


def deviation_topk(
    k_fresh: torch.Tensor,
    k_cached: torch.Tensor,
    k: int,
    v_fresh: Optional[torch.Tensor] = None,
    v_cached: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as deviation_topk_ref; `backend` is auto|cuda|triton|torch."""
    _check_inputs(k_fresh, k_cached, v_fresh, v_cached)
    return _deviation_topk_op(k_fresh, k_cached, int(k), v_fresh, v_cached, backend)
