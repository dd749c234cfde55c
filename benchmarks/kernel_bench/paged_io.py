"""Cases for the GPU block path, kvplug/tiers/paged_io.py (see kernel_bench's contract): whole
blocks of every layer between a vLLM 0.32 LBNHC cache and pinned host rows (save_blocks: device
-> host, load_blocks: host -> device), Llama-3-8B blocks of 16 tokens (2 MiB a block in bf16).
Bytes: the rows once; the share is of a torch copy of the same bytes between the pinned rows and
a device buffer of their size (d2h for saves, h2d for loads). "opaque" is the
worker's current path (BlockRows index copies, layer by layer), unchecked (other row layout).
The cuda backend is PagedBlockIO over kvplug._C's gather_chunks (save) / scatter_chunks (load).
"""
from __future__ import annotations

import torch

from kernel_bench import Case, device, refill
from kvplug.ops.gather_scatter import gather_chunks_ref, scatter_chunks_ref
from kvplug.ops.kv_layout import make_vllm_caches
from kvplug.tiers.cpu import BlockRows
from kvplug.tiers.paged_io import PagedBlockIO

BACKENDS = ("torch", "triton", "cuda")


def _case(L: int, n: int, H: int = 8, D: int = 128, bs: int = 16, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(n)
    nb = 2 * n + 8
    caches = make_vllm_caches(L, nb, bs, H, D, dtype, dev, "LBNHC")
    caches[0]._base.normal_(generator=g)
    ios = {b: PagedBlockIO.from_vllm(caches, "LBNHC", backend=b) for b in BACKENDS}
    io = ios["torch"]
    blocks = torch.randperm(nb, generator=torch.Generator().manual_seed(n))[:n]
    row_ids = torch.arange(n)
    rows = io.allocate_rows(n)
    opaque = BlockRows.allocate([(tuple(c.shape[1:]), c.dtype) for c in caches], n, pin=dev.type == "cuda")
    opaque.store(row_ids.tolist(), caches, blocks.tolist())
    slots = (blocks[:, None] * bs + torch.arange(bs)).flatten().to(dev)
    views = io.views
    ks = [k for k, _ in views]
    name = f"L{L} blocks{n} H{H} D{D} bs{bs} {str(dtype).split('.')[-1]}"
    row_view = rows.views[0]
    staging = torch.empty(rows.buffer.shape, dtype=rows.buffer.dtype, device=dev)
    base = caches[0]._base

    def canonical():  # the rows' expected content: each block's tokens, [n, L, 2, bs, H, D]
        return io._per_block(gather_chunks_ref(views, slots), n)

    def save(b):
        ios[b].save(blocks, rows.buffer, row_ids).synchronize()
        return row_view
    yield Case("save_blocks", name, bytes=n * io.row_bytes, ceiling="d2h", unchecked=("opaque",), ref=canonical,
               cuda_op="gather_chunks", copies=[(rows.buffer, staging)], reset=lambda: refill(rows.buffer),
               fns={**{b: (lambda b=b: save(b)) for b in BACKENDS},
                    "opaque": lambda: opaque.store(row_ids.tolist(), caches, blocks.tolist())})
    io.save(blocks, rows.buffer, row_ids).synchronize()
    chunk = io._per_layer(row_view.to(dev))

    def load(b):
        ios[b].load(rows.buffer, row_ids, blocks).synchronize()
        return ks
    yield Case("load_blocks", name, bytes=n * io.row_bytes, ceiling="h2d", unchecked=("opaque",),
               cuda_op="scatter_chunks", copies=[(staging, rows.buffer)], reset=lambda: refill(base),
               ref=lambda: (scatter_chunks_ref(chunk, views, slots), ks)[1],
               fns={**{b: (lambda b=b: load(b)) for b in BACKENDS},
                    "opaque": lambda: opaque.load(row_ids.tolist(), caches, blocks.tolist())})


def cases(quick: bool):
    for L, n in ([(4, 16)] if quick else [(32, 256)]):
        yield from (_case(L, n, H=2, D=64) if quick else _case(L, n))
