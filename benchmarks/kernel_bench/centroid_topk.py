"""Cases for centroid_topk (see kernel_bench's contract): Llama-3-8B query heads (32 q, 8 kv,
head 128) against fp32 key centroids of a T-token context clustered 16 tokens per centroid.
Decode (Q=1) is bound by reading the centroids: rate in bytes, against a copy of the centroids.
A prefill chunk (Q=512) is bound by the dot products: rate in FLOPs (2 * Q * Hq * C * D).

--check compares the returned scores (rtol 1e-5) and the full-score value of every returned
index, so near-tie orders of equal scores pass (CentroidTopkCheck).

Classes:
    CentroidTopkCheck(scores, indices, full)  == compares values and each index's true score
"""
from __future__ import annotations

import math

import torch

from kernel_bench import Case, device
from kvplug.ops.centroid_topk import centroid_topk, centroid_topk_ref

BACKENDS = ("torch", "triton", "cuda")


class CentroidTopkCheck:
    """Output wrapper; `full` is a zero-arg callable giving the fp32 [Q, Hq, C] scores
    (evaluated only by ==, never while timing)."""

    def __init__(self, scores: torch.Tensor, indices: torch.Tensor, full):
        self.scores, self.indices, self.full = scores, indices, full

    def __eq__(self, want) -> bool:
        full = self.full()
        atol = 1e-5 * max(1.0, float(full.abs().max())) if full.numel() else 0.0
        picked = torch.gather(full, 2, self.indices)
        return (self.indices.shape == want.indices.shape
                and torch.allclose(self.scores, want.scores, rtol=1e-5, atol=atol)
                and torch.allclose(picked, want.scores, rtol=1e-5, atol=atol))

    def __repr__(self) -> str:
        return f"CentroidTopkCheck(indices {tuple(self.indices.shape)})"


def _case(Q: int, T: int, Hq: int, Hkv: int, D: int, k: int, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(Q * T)
    C = max(1, T // 16)
    q = torch.randn(Q, Hq, D, device=dev, dtype=dtype, generator=g)
    c = torch.randn(Hkv, C, D, device=dev, dtype=torch.float32, generator=g)

    def full():
        cc = c.repeat_interleave(Hq // Hkv, dim=0)
        return torch.einsum("qhd,hcd->qhc", q.float(), cc) / math.sqrt(D)

    kk = min(k, C)
    rates = ({"bytes": q.numel() * q.element_size() + c.numel() * 4 + 12 * Q * Hq * kk,
              "copies": [(torch.empty_like(c), c)]} if Q == 1
             else {"flops": 2 * Q * Hq * C * D})
    yield Case("centroid_topk", f"Q{Q} C{C} Hq{Hq}/{Hkv} D{D} k{kk}", **rates,
               ref=lambda: CentroidTopkCheck(*centroid_topk_ref(q, c, k), full),
               fns={b: (lambda b=b: CentroidTopkCheck(*centroid_topk(q, c, k, backend=b), full)) for b in BACKENDS})


def cases(quick: bool):
    shapes = [(1, 512, 4, 2, 64, 8), (9, 512, 4, 2, 64, 8)] if quick else \
        [(1, 4096, 32, 8, 128, 64), (1, 32768, 32, 8, 128, 64), (512, 32768, 32, 8, 128, 64)]
    for shape in shapes:
        yield from _case(*shape)
