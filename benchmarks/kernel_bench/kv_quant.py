"""Cases for quantize_kv / dequantize_kv (see kernel_bench's contract): a Llama-3-8B chunk
[32, 2, T, 8, 128] bf16 to int8 (group 64) and int4 (group 32) and back. Bytes: the KV read once
plus the codes and scales written once (quantize), and the reverse (dequantize). Outputs are
compared as plain tuples (codes, k_meta, v_meta).
"""
from __future__ import annotations

import torch

from kernel_bench import Case, device
from kvplug.ops.kv_quant import (dequantize_kv, dequantize_kv_ref, empty_quant, quantize_kv,
                                 quantize_kv_ref)

BACKENDS = ("torch", "triton", "cuda")
CODECS = ((8, 64), (4, 32))


def _case(L: int, T: int, KV: int = 8, D: int = 128, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(T)
    kv = torch.randn(L, 2, T, KV, D, device=dev, dtype=dtype, generator=g)
    for bits, group in CODECS:
        q = quantize_kv(kv, bits, group)
        qbytes = sum(p.numel() * p.element_size() for p in q)
        out_q = empty_quant(L, T, KV, D, bits, group, dev)
        out = torch.empty_like(kv)
        name = f"L{L} T{T} KV{KV} D{D} int{bits} g{group}"
        nbytes = kv.numel() * kv.element_size() + qbytes
        yield Case("quantize_kv", name, bytes=nbytes, ref=lambda b=bits, gr=group: tuple(quantize_kv_ref(kv, b, gr)),
                   fns={be: (lambda be=be, b=bits, gr=group, o=out_q: tuple(quantize_kv(kv, b, gr, out=o, backend=be)))
                        for be in BACKENDS},
                   notes=[f"int{bits} g{group}: {qbytes / (kv.numel() * kv.element_size()):.3f} of the bf16 bytes"])
        yield Case("dequantize_kv", name, bytes=nbytes,
                   ref=lambda q=q, b=bits, gr=group: dequantize_kv_ref(q, b, gr, dtype),
                   fns={be: (lambda be=be, q=q, b=bits, gr=group: dequantize_kv(q, b, gr, dtype, out=out, backend=be))
                        for be in BACKENDS})


def cases(quick: bool):
    for L, T in ([(4, 256)] if quick else [(32, 4096)]):
        yield from _case(L, T)
