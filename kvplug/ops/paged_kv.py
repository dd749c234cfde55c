"""Chunk KV in and out of vLLM's paged caches, all layers in one kernel launch.

The blender's cached-KV write path on GPU: chunk KV in the canonical layout [L, 2, T, KV, D]
(keys at the chunk's own positions) goes to the engine's cache slots re-rotated to the
prompt positions by one fused rerotate_and_scatter, instead of a re-rotation pass and then
one do_kv_cache_update per layer. Slot -1 skips a token, so a caller can pass its whole KV
tensor and mark the positions the engine already holds with -1 (no slicing copy).

    PagedKV(caches, layout=None, head_size=None)   over vLLM's per-layer [B, H, N, 2D] caches
    PagedKV.from_views(views)                      over (k, v) [nb, bs, KV, D] view pairs
    .views / .spec / .num_layers                   the validated views and their PagedSpec
    .write(chunk, slots, first_layer=0)            scatter_chunks into layers first_layer..
    .write_rerotated(chunk, old_pos, new_pos, inv_freq, style, slots, first_layer=0)
                                                   keys moved old_pos -> new_pos, V copied
    .read(slots, first_layer=0, num_layers=None)   gather_chunks -> [L', 2, T, KV, D]
    write_rerotated_ref(views, chunk, old_pos, new_pos, inv_freq, style, slots)  the torch spec
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvplug.ops.gather_scatter import gather_chunks, rerotate_and_scatter, scatter_chunks
from kvplug.ops.kv_layout import paged_spec, vllm_kv_views
from kvplug.ops.rope import rerotate_keys_ref


def write_rerotated_ref(views, chunk, old_pos, new_pos, inv_freq, style, slots) -> None:
    """For each layer l and token t with s = slots[t] >= 0: K_l[s // bs, s % bs] =
    rerotate_keys_ref(chunk[l, 0], old_pos, new_pos, inv_freq, style)[t], V likewise from
    chunk[l, 1] unchanged. Plain indexing, one layer at a time."""
    bs = views[0][0].shape[1]
    keys = rerotate_keys_ref(chunk[:, 0], old_pos, new_pos, inv_freq, style)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        for layer, (k, v) in enumerate(views):
            k[s // bs, s % bs] = keys[layer, t]
            v[s // bs, s % bs] = chunk[layer, 1, t]


class PagedKV:
    def __init__(self, caches: Sequence[torch.Tensor], layout: str | None = None, head_size: int | None = None):
        self._init([vllm_kv_views(c, layout, head_size) for c in caches])

    @classmethod
    def from_views(cls, views: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> "PagedKV":
        self = cls.__new__(cls)
        self._init([tuple(p) for p in views])
        return self

    def _init(self, views) -> None:
        self.views = views
        self.spec = paged_spec([k for k, _ in views], [v for _, v in views])  # ValueError naming the shape
        self.num_layers = self.spec.num_layers

    def _layers(self, chunk: torch.Tensor, first_layer: int):
        n = chunk.shape[0] if chunk.dim() == 5 else -1
        if not (0 <= first_layer and n >= 0 and first_layer + n <= self.num_layers):
            raise ValueError(f"chunk of shape {tuple(chunk.shape)} from layer {first_layer}: expected "
                             f"[layers, 2, T, {self.spec.num_heads}, {self.spec.head_dim}] within "
                             f"{self.num_layers} layers")
        return self.views[first_layer:first_layer + n]

    def _on_device(self, t: torch.Tensor, dtype=None) -> torch.Tensor:
        # Chunks may come from the CPU store; the kernels take dense tensors on the cache's device.
        return t.to(device=self.spec.device, dtype=dtype or t.dtype, non_blocking=True).contiguous()

    def write(self, chunk: torch.Tensor, slots: torch.Tensor, first_layer: int = 0, backend: str = "auto") -> None:
        """chunk [L', 2, T, KV, D] (any device) into layers first_layer..first_layer+L'-1."""
        views = self._layers(chunk, first_layer)
        scatter_chunks(self._on_device(chunk), views, self._on_device(slots, torch.int64), backend=backend)

    def write_rerotated(self, chunk: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor,
                        inv_freq: torch.Tensor, style: str, slots: torch.Tensor, first_layer: int = 0,
                        backend: str = "auto") -> None:
        """Like write, with keys re-rotated from old_pos to new_pos (int64 [T]) in the same
        launch; inv_freq fp32 [R/2] and style "neox"|"gptj" as the model's RoPE."""
        views = self._layers(chunk, first_layer)
        rerotate_and_scatter(self._on_device(chunk), self._on_device(old_pos, torch.int64),
                             self._on_device(new_pos, torch.int64), self._on_device(inv_freq), style, views,
                             self._on_device(slots, torch.int64), backend=backend)

    def read(self, slots: torch.Tensor, first_layer: int = 0, num_layers: int | None = None,
             backend: str = "auto") -> torch.Tensor:
        """[L', 2, T, KV, D] of layers first_layer.. at slots (each in range, no -1)."""
        n = self.num_layers - first_layer if num_layers is None else num_layers
        if not (0 <= first_layer and n >= 1 and first_layer + n <= self.num_layers):
            raise ValueError(f"layers [{first_layer}, {first_layer + n}) outside {self.num_layers} layers")
        return gather_chunks(self.views[first_layer:first_layer + n], self._on_device(slots, torch.int64),
                             backend=backend)
