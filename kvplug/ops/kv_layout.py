"""Describing vLLM paged KV caches for the chunk gather/scatter kernels.

A paged cache, as vLLM's GPU attention backends hold it, is per layer one K view and
one V view, each `[num_blocks, block_size, kv_heads, head_dim]` with arbitrary strides
on the block, token and head dims but `head_dim` contiguous. Token slot
`s = block_id * block_size + offset` (vLLM's slot_mapping) lives at
`view[s // block_size, s % block_size]`.

Methods:
    split_kv_cache(tensor, layout)   one layer's vLLM cache tensor -> (k_view, v_view)
    paged_spec(k_caches, v_caches)   validate the views, return their shared PagedSpec
    pointer_table(k_caches, v_caches) int64 tensor [2L] of base addresses, K/V interleaved
    base_alignment(k_caches, v_caches) byte alignment shared by all base addresses
    check_slots(slots, num_slots, allow_skip)  raise on out-of-range slots
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("flash", "flashinfer")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def split_kv_cache(tensor: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) views of one layer's cache: "flash" is [2, nb, bs, H, D] (FlashAttention),
    "flashinfer" is [nb, 2, bs, H, D] (FlashInfer). No copy is made."""
    if tensor.dim() != 5:
        raise ValueError(f"kv cache of shape {tuple(tensor.shape)}: expected 5 dims")
    if layout == "flash":
        if tensor.shape[0] != 2:
            raise ValueError(f"flash kv cache of shape {tuple(tensor.shape)}: expected [2, nb, bs, H, D]")
        return tensor[0], tensor[1]
    if layout == "flashinfer":
        if tensor.shape[1] != 2:
            raise ValueError(f"flashinfer kv cache of shape {tuple(tensor.shape)}: expected [nb, 2, bs, H, D]")
        return tensor[:, 0], tensor[:, 1]
    raise ValueError(f"layout={layout!r}: allowed values are {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class PagedSpec:
    """What every K and V view of a model shares; strides are in elements."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    stride_block: int
    stride_token: int
    stride_head: int
    dtype: torch.dtype
    device: torch.device

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def paged_spec(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> PagedSpec:
    """Check that all 2L views have one shape, one stride set, one dtype and device,
    and a contiguous head_dim; the kernels take one stride set for all layers."""
    if len(k_caches) == 0 or len(k_caches) != len(v_caches):
        raise ValueError(f"kv caches: {len(k_caches)} K views and {len(v_caches)} V views, expected L >= 1 of each")
    first = k_caches[0]
    if first.dim() != 4:
        raise ValueError(f"kv cache view of shape {tuple(first.shape)}: expected [num_blocks, block_size, H, D]")
    if first.dtype not in DTYPES:
        raise ValueError(f"kv cache dtype {first.dtype}: supported are {DTYPES}")
    for i, view in enumerate([*k_caches, *v_caches]):
        if view.shape != first.shape or view.stride() != first.stride():
            raise ValueError(
                f"kv cache view {i} has shape {tuple(view.shape)} strides {view.stride()}, "
                f"view 0 has {tuple(first.shape)} strides {first.stride()}: all layers must match")
        if view.dtype != first.dtype or view.device != first.device:
            raise ValueError(f"kv cache view {i} is {view.dtype} on {view.device}, "
                             f"view 0 is {first.dtype} on {first.device}")
    if first.stride(3) != 1 and first.shape[3] > 1:
        raise ValueError(f"kv cache view of shape {tuple(first.shape)} strides {first.stride()}: "
                         "head_dim must be contiguous")
    nb, bs, h, d = first.shape
    return PagedSpec(len(k_caches), nb, bs, h, d, first.stride(0), first.stride(1), first.stride(2),
                     first.dtype, first.device)


def base_alignment(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> int:
    """Largest power of two <= 16 dividing every view's base address, in bytes (the CUDA
    copies pick their vector width from it). Reads data_ptr: call it outside traced code."""
    align = 16
    for view in [*k_caches, *v_caches]:
        ptr = view.data_ptr()
        align = min(align, (ptr & -ptr) or 16)
    return align


# Pointer tables are cached by (device, addresses): vLLM allocates its caches once, so
# the host->device copy happens on the first call (before any CUDA graph capture) only.
_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 64


def pointer_table(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
    """int64 [2L] on the caches' device: entry 2*l is layer l's K base address, 2*l+1 its V.

    The addresses stay valid only while the views' storages live; callers keep them alive."""
    ptrs = []
    for k, v in zip(k_caches, v_caches):
        ptrs += [k.data_ptr(), v.data_ptr()]
    key = (str(k_caches[0].device), tuple(ptrs))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = torch.tensor(ptrs, dtype=torch.int64).to(k_caches[0].device)
        _TABLES[key] = table
    return table


def check_slots(slots: torch.Tensor, num_slots: int, allow_skip: bool) -> None:
    """Raise unless every slot is in [0, num_slots) (or -1 when allow_skip).

    On CPU this raises ValueError; on CUDA it is a device-side assert
    (torch._assert_async) so the hot path never waits for the GPU. Data dependent: the
    dispatchers call it inside their custom ops, where torch.compile does not trace."""
    if slots.dim() != 1 or slots.dtype != torch.int64:
        raise ValueError(f"slots of shape {tuple(slots.shape)} dtype {slots.dtype}: expected int64 [T]")
    if slots.numel() == 0:
        return
    low = -1 if allow_skip else 0
    ok = (slots >= low) & (slots < num_slots)
    if slots.device.type == "cuda":
        torch._assert_async(ok.all(), "kvplug: slot out of range")
    elif not bool(ok.all()):
        bad = slots[~ok][:4].tolist()
        allowed = "-1 or " if allow_skip else ""
        raise ValueError(f"slots {bad}...: each must be {allowed}in [0, {num_slots})")
