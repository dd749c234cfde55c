"""Moving one page between SGLang's host pool and a kvplug payload (a contiguous CPU uint8 tensor).

Only the pool's own page methods are used (get_data_page / set_from_flat_data_page), so every
layout the pool supports (layer_first, page_first, page_first_direct, page_head; MHA and MLA)
works, and the bytes are exactly what SGLang's own backends store for that layout.

    page_indices(host_indices, n, page_size) -> list[int] | None   the first slot of each page
    read_page(pool, index, spec) -> Tensor    the page at slot `index` as uint8, in memory of its own
    write_page(pool, index, payload, spec) -> bool   copy a payload into the page; False if it does
                                              not have the page's size
    as_payload(value, spec) -> Tensor | None  a fresh uint8 copy of a flat page tensor, None if it
                                              is not one of the pool's pages
"""
from __future__ import annotations

import torch

from kvplug.sglang.keys import PageSpec


def page_indices(host_indices, n: int, page_size: int) -> list[int] | None:
    """SGLang passes the token slots of n whole pages; None unless there are exactly n * page_size."""
    if not isinstance(host_indices, torch.Tensor) or host_indices.numel() != n * page_size:
        return None
    return host_indices.reshape(-1)[::page_size].tolist() if n else []


def read_page(pool, index: int, spec: PageSpec) -> torch.Tensor:
    # The writer thread keeps the payload until it is on disk, and SGLang may reuse the host slot
    # as soon as the call returns: the payload must own its memory. Flattening a strided page
    # (MHA layouts) already made a copy; a flat page of a contiguous slice (MLA page_first) is a
    # view of the pool and is copied here.
    page = pool.get_data_page(index, flat=True)
    if page.dtype != spec.dtype or page.numel() != spec.numel or page.device.type != "cpu":
        raise ValueError(f"host pool page at {index} is {page.dtype} x {page.numel()} on {page.device}, "
                         f"expected {spec.dtype} x {spec.numel} on cpu")
    if _shares_memory(page, pool) or not page.is_contiguous():
        return as_payload(page, spec)
    return page.view(torch.uint8)


def as_payload(value, spec: PageSpec) -> torch.Tensor | None:
    if (not isinstance(value, torch.Tensor) or value.dtype != spec.dtype or value.numel() != spec.numel
            or value.device.type != "cpu"):
        return None
    out = torch.empty(spec.nbytes, dtype=torch.uint8)
    out.view(spec.dtype).copy_(value.reshape(-1))
    return out


def _shares_memory(page: torch.Tensor, pool) -> bool:
    buffers = [b for b in (getattr(pool, "kv_buffer", None),) if isinstance(b, torch.Tensor)]
    if not buffers:  # a pool without one kv_buffer: copy rather than guess
        return True
    start = page.untyped_storage().data_ptr()
    return any(b.untyped_storage().data_ptr() == start for b in buffers)


def write_page(pool, index: int, payload: torch.Tensor, spec: PageSpec) -> bool:
    if payload.dtype != torch.uint8 or payload.numel() != spec.nbytes:
        return False
    pool.set_from_flat_data_page(index, payload.view(spec.dtype))
    return True
