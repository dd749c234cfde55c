"""Cases for merge_clusters (see kernel_bench's contract): Llama-3-8B K and V [T, 8, 128]
bf16 merged into T/16 clusters per kv head from a random assignment.
bytes: K, V and assign read once; merged K, V and log sizes written; the ceiling is a copy of K and V.
Outputs are deterministic floats, so the default by-dtype tolerance applies.
"""
from __future__ import annotations

import torch

from kernel_bench import Case, device
from kvplug.ops.merge_clusters import merge_clusters, merge_clusters_ref

BACKENDS = ("torch", "triton", "cuda")


def _case(T: int, H: int, D: int, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(T)
    C = max(1, T // 16)
    keys, values = (torch.randn(T, H, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
    assign = torch.randint(C, (H, T), device=dev, generator=g)
    nbytes = 2 * keys.numel() * keys.element_size() + 8 * H * T + 2 * H * C * D * keys.element_size() + 4 * H * C
    yield Case("merge_clusters", f"T{T} H{H} D{D} C{C} {str(dtype).split('.')[-1]}", bytes=nbytes,
               copies=[(torch.empty_like(keys), keys), (torch.empty_like(values), values)],
               ref=lambda: merge_clusters_ref(keys, values, assign, C),
               fns={b: (lambda b=b: merge_clusters(keys, values, assign, C, backend=b)) for b in BACKENDS})


def cases(quick: bool):
    for T, H, D in ([(257, 2, 64)] if quick else [(4096, 8, 128), (32768, 8, 128)]):
        yield from _case(T, H, D)
