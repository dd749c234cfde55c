"""Each layer's attention kind: its RoPE and its sliding window, for models whose layers differ
(Gemma 3: sliding-window layers with one RoPE base, global layers with another).

An adapter (kvplug/blend/adapter.py) may define rope_for(i) and window(i); one that does not has
one RoPE (`rope`) for every layer and full causal attention everywhere, and LayerKinds gives it
exactly the behaviour it had before layers could differ.

    LayerKinds.of(adapter)                      read once from the adapter
    LayerKinds(ropes, windows)                  ropes: [(inv_freq fp32 [R/2], style)] per layer;
                                                windows: [W or None] per layer
    .rope(i) -> (inv_freq, style)               layer i's RoPE
    .window(i) -> int | None                    layer i's window W: a query at position p sees keys
                                                at p-W+1..p; None: every key at <= p
    .groups -> [(layers, inv_freq, style)]      layers sharing a RoPE (first-seen order)
    .rerotate(keys [L, T, KV, D], old_pos, new_pos)   in place, one rerotate_keys call per group
    window_mask(q_pos [T], k_pos [K], window) -> bool [T, K]   causal (and windowed) visibility
"""
from __future__ import annotations

import torch

from kvplug.ops.rope import rerotate_keys

Rope = tuple[torch.Tensor, str]


class LayerKinds:
    def __init__(self, ropes, windows):
        if len(ropes) != len(windows):
            raise ValueError(f"{len(ropes)} RoPEs for {len(windows)} layers")
        for i, w in enumerate(windows):
            if w is not None and w < 1:
                raise ValueError(f"layer {i}: sliding window {w} must be >= 1 (None for full attention)")
        self.ropes: tuple[Rope, ...] = tuple(ropes)
        self.windows: tuple[int | None, ...] = tuple(windows)
        self.groups = _groups(self.ropes)

    @classmethod
    def of(cls, adapter) -> "LayerKinds":
        n = adapter.num_layers
        rope_for = getattr(adapter, "rope_for", None)
        ropes = [rope_for(i) for i in range(n)] if rope_for is not None else [adapter.rope] * n
        window = getattr(adapter, "window", None)
        windows = [window(i) for i in range(n)] if callable(window) else [None] * n
        return cls(ropes, windows)

    def rope(self, i: int) -> Rope:
        return self.ropes[i]

    def window(self, i: int) -> int | None:
        return self.windows[i]

    def rerotate(self, keys: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor) -> torch.Tensor:
        """keys [L, T, KV, D] (any strides with a contiguous head dim) moved from old_pos to
        new_pos, layer by layer with its own RoPE, in place: one kernel call per group of layers
        sharing a RoPE, on a strided view where the group's layers are evenly spaced, else on a
        gathered copy written back."""
        if keys.shape[0] != len(self.ropes):
            raise ValueError(f"keys of shape {tuple(keys.shape)}: expected {len(self.ropes)} layers first")
        for layers, inv_freq, style in self.groups:
            view = _layer_view(keys, layers)
            inv_freq = inv_freq.to(keys.device)
            if view is not None:
                rerotate_keys(view, old_pos, new_pos, inv_freq, style, out=view)
                continue
            idx = torch.tensor(layers, device=keys.device)
            part = keys.index_select(0, idx)
            rerotate_keys(part, old_pos, new_pos, inv_freq, style, out=part)
            keys.index_copy_(0, idx, part)
        return keys


def _groups(ropes: tuple[Rope, ...]) -> tuple[tuple[list[int], torch.Tensor, str], ...]:
    groups: list[tuple[list[int], torch.Tensor, str]] = []
    for i, (inv_freq, style) in enumerate(ropes):
        for layers, f, s in groups:
            if s == style and (f is inv_freq or (f.shape == inv_freq.shape and torch.equal(f, inv_freq))):
                layers.append(i)
                break
        else:
            groups.append(([i], inv_freq, style))
    return tuple(groups)


def _layer_view(keys: torch.Tensor, layers: list[int]) -> torch.Tensor | None:
    """keys[layers] as a view when the layers are evenly spaced, else None."""
    if len(layers) == 1:
        return keys[layers[0]:layers[0] + 1]
    step = layers[1] - layers[0]
    if any(b - a != step for a, b in zip(layers, layers[1:])):
        return None
    return keys[layers[0]:layers[-1] + 1:step]


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [T, K]: key k is visible to query t (k_pos <= q_pos, and within the window)."""
    d = q_pos[:, None] - k_pos[None, :]
    return (d >= 0) if window is None else (d >= 0) & (d < window)
