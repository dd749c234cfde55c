"""Triton: GQA query x centroid scores (fp32), the scoring half of centroid_topk.

Functions:
    centroid_scores(queries, centroids)  fp32 [Q, Hq, C] = q . c / sqrt(D), head h -> kv head h // G
"""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _centroid_scores_kernel(q_ptr, c_ptr, out_ptr, C, D, Hq, group, s_qq, s_qh, scale,
                            BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (Q * Hq, centroid blocks): one query row against BLOCK_C centroids of its kv head.
    row = tl.program_id(0)
    qi = row // Hq
    h = row % Hq
    kv = h // group
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    acc = tl.zeros([BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(q_ptr + qi.to(tl.int64) * s_qq + h * s_qh + d, mask=dmask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + (kv * C + cc).to(tl.int64)[:, None] * D + d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(c * q[None, :], axis=1)
    tl.store(out_ptr + row.to(tl.int64) * C + cc, acc * scale, mask=cmask)


def centroid_scores(queries: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """queries [Q, Hq, D] (unit stride along D), centroids contiguous [Hkv, C, D]."""
    if queries.dim() != 3 or (queries.shape[2] > 1 and queries.stride(2) != 1):
        raise ValueError(f"centroid_scores: queries shape {tuple(queries.shape)} strides {queries.stride()}: "
                         "must be [Q, Hq, D] with unit stride along D")
    Q, Hq, D = queries.shape
    if (centroids.dim() != 3 or not centroids.is_contiguous() or centroids.shape[2] != D
            or centroids.shape[0] == 0 or Hq % centroids.shape[0] != 0):
        raise ValueError(f"centroid_scores: centroids {tuple(centroids.shape)} must be contiguous [Hkv, C, {D}] "
                         f"with Hq={Hq} a multiple of Hkv")
    Hkv, C, _ = centroids.shape
    out = torch.empty((Q, Hq, C), dtype=torch.float32, device=queries.device)
    if out.numel() == 0:
        return out
    block_c = 32
    block_d = min(128, max(16, triton.next_power_of_2(D)))
    grid = (Q * Hq, triton.cdiv(C, block_c))
    _centroid_scores_kernel[grid](queries, centroids, out, C, D, Hq, Hq // Hkv,
                                  queries.stride(0), queries.stride(1), 1.0 / math.sqrt(D),
                                  BLOCK_C=block_c, BLOCK_D=block_d)
    return out
