"""Query -> centroid top-k: which key clusters each query head should attend to (GQA aware).

Functions:
    centroid_topk_ref(queries, centroids, k)           torch spec (fp32 math)
    centroid_topk(queries, centroids, k, backend)      dispatcher (cuda -> triton -> torch)
"""
import math

import torch

from kvplug.ops import _backend

OP = "centroid_topk"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def centroid_topk_ref(queries: torch.Tensor, centroids: torch.Tensor, k: int):
    """Scores of every centroid for every query head, and the k best.

    queries [Q, Hq, D], centroids [Hkv, C, D] (fp16/bf16/fp32, dtypes may differ), same device.
    Query head h reads kv head h // (Hq // Hkv); ValueError when Hq % Hkv != 0.
    score[q, h, c] = (queries[q, h] . centroids[h // G, c]) / sqrt(D) in fp32.
    Returns (scores fp32 [Q, Hq, kk], indices int64 [Q, Hq, kk]), kk = clamp(k, 0, C),
    sorted by descending score (ties in any order).
    """
    _check(queries, centroids)
    group = queries.shape[1] // centroids.shape[0]
    c = centroids.float().repeat_interleave(group, dim=0)  # [Hq, C, D]
    scores = torch.einsum("qhd,hcd->qhc", queries.float(), c) * (1.0 / math.sqrt(queries.shape[2]))
    return torch.topk(scores, clamp_k(k, centroids.shape[1]), dim=-1)


def clamp_k(k: int, n: int) -> int:
    return max(0, min(int(k), n))


def _check(queries: torch.Tensor, centroids: torch.Tensor) -> None:
    if queries.dim() != 3 or centroids.dim() != 3:
        raise ValueError(f"centroid_topk: queries {tuple(queries.shape)} must be [Q, Hq, D] and "
                         f"centroids {tuple(centroids.shape)} [Hkv, C, D]")
    Q, Hq, D = queries.shape
    Hkv, C, Dc = centroids.shape
    if Dc != D or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"centroid_topk: queries {tuple(queries.shape)} and centroids {tuple(centroids.shape)}: "
                         "head dims must match and Hq must be a multiple of Hkv")
    if queries.dtype not in FLOATS or centroids.dtype not in FLOATS:
        raise ValueError(f"centroid_topk: dtypes {queries.dtype}, {centroids.dtype} must be fp16/bf16/fp32")
    if queries.device != centroids.device:
        raise ValueError(f"centroid_topk: queries on {queries.device}, centroids on {centroids.device}")


@torch.library.custom_op("kvplug::centroid_topk", mutates_args=())
def _centroid_topk_op(queries: torch.Tensor, centroids: torch.Tensor, k: int,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _backend.choose(OP, queries.device, backend)
    if impl == "torch":
        scores, idx = centroid_topk_ref(queries, centroids, k)
        return scores.contiguous(), idx.contiguous()
    if queries.shape[2] > 1 and queries.stride(2) != 1:
        queries = queries.contiguous()  # kernels need unit stride along D only
    centroids = centroids.contiguous()
    if impl == "cuda":
        return _backend.cuda_ops().centroid_topk(queries, centroids, k)
    from kvplug._triton.centroid_topk import centroid_scores

    scores = centroid_scores(queries, centroids)
    top = torch.topk(scores, clamp_k(k, centroids.shape[1]), dim=-1)
    return top.values, top.indices


@_centroid_topk_op.register_fake
def _(queries, centroids, k, backend):
    shape = (queries.shape[0], queries.shape[1], clamp_k(k, centroids.shape[1]))
    return queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64)


def centroid_topk(queries: torch.Tensor, centroids: torch.Tensor, k: int, backend: str = "auto"):
    """Same contract as centroid_topk_ref; `backend` is auto|cuda|triton|torch."""
    _check(queries, centroids)
    return _centroid_topk_op(queries, centroids, int(k), backend)
