"""Paged-cache layouts of vLLM <= 0.10, kept by the kernels' tests as stride variety (kvplug itself
reads only vLLM 0.32's layouts, kvplug/ops/kv_layout.py): "flash" is [2, nb, bs, H, D]
(FlashAttention), "flashinfer" is [nb, 2, bs, H, D].

    split_kv_cache(tensor, layout) -> (k, v)   views of one layer's cache, any of those or VLLM_LAYOUTS
"""
import torch

from kvplug.ops.kv_layout import VLLM_LAYOUTS, vllm_kv_views

LEGACY_LAYOUTS = ("flash", "flashinfer")
LAYOUTS = (*LEGACY_LAYOUTS, *VLLM_LAYOUTS)


def split_kv_cache(tensor: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) views of one layer's cache; no copy is made."""
    if layout in VLLM_LAYOUTS:
        return vllm_kv_views(tensor, layout)
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
