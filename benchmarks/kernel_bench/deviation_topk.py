"""Cases for deviation_topk (see kernel_bench's contract): CacheBlend's check layer of a
Llama-3-8B prompt, K and V [T, 8, 128] bf16 fresh vs cached, top 15% of tokens.
bytes: the four inputs read once + fp32 scores + int64 indices written; the ceiling is a copy of
the four inputs.

Top-k of fp32 scores summed in different orders may order near-equal tokens differently,
so outputs are wrapped in TopkCheck, which --check compares by the reference's scores of
the picked tokens (an int compare would flag legal tie orders).

Classes:
    TopkCheck(scores, indices)   == compares scores (rtol 1e-5) and the picked tokens' scores
"""
from __future__ import annotations

import torch

from kernel_bench import Case, device
from kvplug.ops.deviation_topk import deviation_topk, deviation_topk_ref

BACKENDS = ("torch", "triton", "cuda")


class TopkCheck:
    """Output wrapper: want == got when the scores agree and the picked sets have equal
    reference scores (sorted). Built only around tensors, so it adds no device work."""

    def __init__(self, scores: torch.Tensor, indices: torch.Tensor):
        self.scores, self.indices = scores, indices

    def __eq__(self, want) -> bool:
        ref = want.scores.float()
        mine = ref[self.indices].sort().values
        theirs = ref[want.indices].sort().values
        atol = 1e-5 * float(ref.abs().max()) if ref.numel() else 0.0
        return (self.indices.shape == want.indices.shape
                and torch.allclose(self.scores.float(), ref, rtol=1e-5, atol=atol)
                and torch.allclose(mine, theirs, rtol=1e-5, atol=atol))

    def __repr__(self) -> str:
        return f"TopkCheck(scores {tuple(self.scores.shape)}, indices {tuple(self.indices.shape)})"


def _case(T: int, H: int, D: int, ratio: float = 0.15, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(T)
    kf, vf = (torch.randn(T, H, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
    kc = kf + 0.1 * torch.randn(T, H, D, device=dev, dtype=dtype, generator=g)
    vc = vf + 0.1 * torch.randn(T, H, D, device=dev, dtype=dtype, generator=g)
    k = max(1, int(ratio * T))
    nbytes = 4 * kf.numel() * kf.element_size() + 4 * T + 8 * k
    yield Case("deviation_topk", f"T{T} H{H} D{D} k{k} {str(dtype).split('.')[-1]}", bytes=nbytes,
               copies=[(torch.empty_like(t), t) for t in (kf, kc, vf, vc)],
               ref=lambda: TopkCheck(*deviation_topk_ref(kf, kc, k, vf, vc)),
               fns={b: (lambda b=b: TopkCheck(*deviation_topk(kf, kc, k, vf, vc, backend=b))) for b in BACKENDS})


def cases(quick: bool):
    for T, H, D in ([(257, 2, 64)] if quick else [(4096, 8, 128), (32768, 8, 128)]):
        yield from _case(T, H, D)
