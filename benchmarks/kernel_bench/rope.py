"""Cases for rerotate_keys (see kernel_bench's contract): the K half of a Llama-3-8B chunk,
[32, T, 8, 128] bf16, re-rotated out of place (bytes: keys read once, written once; the ceiling
is a copy of the keys into the output buffer).
"""
from __future__ import annotations

import torch

from kernel_bench import Case, device, refill
from kvplug.ops.rope import rerotate_keys, rerotate_keys_ref, rope_inv_freq

BACKENDS = ("torch", "triton", "cuda")


def _case(L: int, T: int, H: int = 8, D: int = 128, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(T)
    keys = torch.randn(L, T, H, D, device=dev, dtype=dtype, generator=g)
    out = torch.empty_like(keys)
    old = torch.randint(0, 8192, (T,), device=dev, generator=g)
    new = torch.randint(0, 32768, (T,), device=dev, generator=g)
    inv_freq = rope_inv_freq(D, 500000.0).to(dev)
    name = f"L{L} T{T} H{H} D{D} {str(dtype).split('.')[-1]}"
    yield Case("rerotate_keys", name, bytes=2 * keys.numel() * keys.element_size() + 16 * T,
               copies=[(out, keys)], reset=lambda: refill(out),
               ref=lambda: rerotate_keys_ref(keys, old, new, inv_freq, "neox"),
               fns={b: (lambda b=b: rerotate_keys(keys, old, new, inv_freq, "neox", out=out, backend=b))
                    for b in BACKENDS})


def cases(quick: bool):
    for L, T in ([(4, 256)] if quick else [(32, 4096), (32, 32768)]):
        yield from _case(L, T)
