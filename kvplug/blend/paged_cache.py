"""A model adapter's KV access to vLLM's CUDA paged caches through PagedKV (kvplug/ops/paged_kv.py):
the blender's write and read path on the canonical KV path, every layer in one kernel launch.

The per-layer methods of the adapter interface (kvplug/blend/adapter.py) and its optional
all-layer ones, over vLLM 0.32's registered per-layer caches [B, H, N, 2D] (any KVCacheLayout);
the caches' kernel block size must be the slot arithmetic's block size. bind(adapter) sets the
optional methods on an adapter, which the blender then uses instead of per-layer write_kv/read_kv.

    PagedCacheKV(caches, rope, layout=None)        rope: (inv_freq fp32 [R/2], "neox"|"gptj")
    .write_kv(i, k, v, slots)                      k, v [T, KV, D] into layer i
    .read_kv(i, slots) -> (k, v)                   [T, KV, D] of layer i
    .write_kv_layers(kv, slots, first_layer=0)     kv [L', 2, T, KV, D] into layers first_layer..
    .write_rerotated(kv, old_pos, new_pos, slots, first_layer=0)   the same with keys moved from
                                                   old_pos to new_pos in the same launch
    .read_kv_layers(slots, first_layer=0, num_layers=None) -> [L', 2, T, KV, D]
    .bind(adapter)                                 adapter.write_kv_layers / write_rerotated /
                                                   read_kv_layers become these
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvplug.ops.paged_kv import PagedKV

OPTIONAL = ("write_kv_layers", "write_rerotated", "read_kv_layers")


class PagedCacheKV:
    def __init__(self, caches: Sequence[torch.Tensor], rope: tuple[torch.Tensor, str], layout: str | None = None):
        self.paged = PagedKV(caches, layout)
        self.inv_freq, self.style = rope

    def write_kv(self, i: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        if k.shape != v.shape or k.dim() != 3:
            raise ValueError(f"k of shape {tuple(k.shape)} and v of shape {tuple(v.shape)}: expected [T, KV, D] each")
        self.paged.write(torch.stack([k, v])[None], slots, first_layer=i)

    def read_kv(self, i: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.paged.read(slots, first_layer=i, num_layers=1)
        return kv[0, 0], kv[0, 1]

    def write_kv_layers(self, kv: torch.Tensor, slots: torch.Tensor, first_layer: int = 0) -> None:
        self.paged.write(kv, slots, first_layer)

    def write_rerotated(self, kv: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, slots: torch.Tensor,
                        first_layer: int = 0) -> None:
        self.paged.write_rerotated(kv, old_pos, new_pos, self.inv_freq, self.style, slots, first_layer)

    def read_kv_layers(self, slots: torch.Tensor, first_layer: int = 0, num_layers: int | None = None) -> torch.Tensor:
        return self.paged.read(slots, first_layer, num_layers)

    def bind(self, adapter) -> None:
        for name in OPTIONAL:
            setattr(adapter, name, getattr(self, name))
