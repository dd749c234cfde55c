"""RoPE re-rotation of cached keys: a key computed at position p is moved to position q
by one rotation of angle (q - p) * inv_freq, since RoPE rotations compose.

Methods:
    rope_inv_freq(rotary_dim, theta, scaling)   fp32 inv_freq [rotary_dim // 2] for HF rope_scaling
    rerotate_keys_ref(keys, old_pos, new_pos, inv_freq, style)   the torch spec
    rerotate_keys(keys, old_pos, new_pos, inv_freq, style, out=None, backend="auto")  dispatcher
    check_rope_args(keys, old_pos, new_pos, inv_freq, style)     ValueError on bad inputs
"""
from __future__ import annotations

import math

import torch

from kvplug.ops import _backend
from kvplug.ops.kv_layout import DTYPES

STYLES = ("neox", "gptj")
SCALINGS = ("default", "linear", "llama3")


def _scaling_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "dynamic":
        raise ValueError("rope_scaling type 'dynamic': its frequencies depend on the sequence length, "
                         "so cached keys cannot be re-rotated; allowed are " + ", ".join(SCALINGS))
    if kind not in SCALINGS:
        raise ValueError(f"rope_scaling type {kind!r}: allowed are {', '.join(SCALINGS)}")
    return kind


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Mirrors transformers' _compute_llama3_parameters: long wavelengths are divided by
    # factor, short ones kept, the band between is interpolated smoothly.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """inv_freq[i] = 1 / theta**(2i / rotary_dim), fp32 on CPU, then the HF rope_scaling
    adjustment: None/"default" none, "linear" divides by factor, "llama3" smooths between
    low_freq_factor and high_freq_factor. "dynamic" raises ValueError (position dependent)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim={rotary_dim}: must be a positive even number")
    kind = _scaling_type(scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq.float()


def check_rope_args(keys, old_pos, new_pos, inv_freq, style) -> None:
    """keys [..., T, H, D] with D contiguous; positions int64 [T]; inv_freq fp32 [R/2], R <= D."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: allowed are {', '.join(STYLES)}")
    if keys.dim() < 3 or keys.dtype not in DTYPES:
        raise ValueError(f"keys of shape {tuple(keys.shape)} dtype {keys.dtype}: expected [..., T, H, D] in {DTYPES}")
    t, d = keys.shape[-3], keys.shape[-1]
    for name, pos in (("old_pos", old_pos), ("new_pos", new_pos)):
        if pos.shape != (t,) or pos.dtype != torch.int64 or pos.device != keys.device:
            raise ValueError(f"{name} of shape {tuple(pos.shape)} {pos.dtype} on {pos.device}: "
                             f"expected int64 [{t}] on {keys.device}")
    if inv_freq.dim() != 1 or inv_freq.dtype != torch.float32 or inv_freq.device != keys.device:
        raise ValueError(f"inv_freq of shape {tuple(inv_freq.shape)} {inv_freq.dtype}: expected fp32 [rotary_dim/2] "
                         f"on {keys.device}")
    if not 1 <= 2 * inv_freq.numel() <= d:
        raise ValueError(f"inv_freq of shape {tuple(inv_freq.shape)}: rotary_dim must be in [2, head_dim={d}]")
    if d % 2:
        raise ValueError(f"keys of shape {tuple(keys.shape)}: head_dim must be even for RoPE")
    if keys.stride(-1) != 1 and d > 1:
        raise ValueError(f"keys of shape {tuple(keys.shape)} strides {keys.stride()}: head_dim must be contiguous")


def rerotate_keys_ref(keys, old_pos, new_pos, inv_freq, style: str = "neox") -> torch.Tensor:
    """Keys [..., T, H, D] rotated by RoPE at old_pos[t], returned as if rotated at new_pos[t].

    angle[t, i] = float32(new_pos[t] - old_pos[t]) * inv_freq[i]; cos/sin in fp32. Only the
    first R = 2 * len(inv_freq) dims of each head rotate (partial rotary); the rest are
    copied. neox rotates pairs (i, i + R/2), gptj pairs (2i, 2i + 1). Math in fp32, result
    in keys.dtype (fp32, fp16 or bf16)."""
    r = 2 * inv_freq.numel()
    angle = (new_pos - old_pos).to(torch.float32)[:, None] * inv_freq.float()[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # [T, 1, R/2]
    x = keys.float()
    rot, rest = x[..., :r], x[..., r:]
    if style == "neox":
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
        y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([y, rest], dim=-1).to(keys.dtype)


def _rerotate_torch(keys, old_pos, new_pos, inv_freq, style: str, out: torch.Tensor) -> None:
    """rerotate_keys_ref's math (fp32), written straight into `out` half by half, so the
    blender's [layers, tokens, heads, dim] keys take a few half-size temporaries, not six
    full-size ones."""
    r = 2 * inv_freq.numel()
    angle = (new_pos - old_pos).to(torch.float32)[:, None] * inv_freq.float()[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    if style == "neox":
        x1, x2 = keys[..., : r // 2].float(), keys[..., r // 2:r].float()
        o1, o2 = out[..., : r // 2], out[..., r // 2:r]
    else:
        x1, x2 = keys[..., 0:r:2].float(), keys[..., 1:r:2].float()
        o1, o2 = out[..., 0:r:2], out[..., 1:r:2]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # both before writing: out may be keys
    o1.copy_(y1)
    o2.copy_(y2)
    if r < keys.shape[-1] and out.data_ptr() != keys.data_ptr():
        out[..., r:].copy_(keys[..., r:])


def _as_4d(x: torch.Tensor, name: str) -> torch.Tensor:
    """[..., T, H, D] -> [N, T, H, D] as a view; ValueError when no view exists."""
    try:
        return x.view(-1, *x.shape[-3:])
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(x.shape)} strides {x.stride()}: leading dims must flatten "
                         "into one without a copy") from None


@torch.library.custom_op("kvplug::rerotate_keys", mutates_args=("out",))
def _rerotate_keys_op(keys: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq: torch.Tensor,
                      style: str, out: torch.Tensor, backend: str) -> None:
    which = _backend.choose("rerotate_keys", keys.device, backend)
    if which == "torch":
        _rerotate_torch(keys, old_pos, new_pos, inv_freq, style, out)
        return
    out4 = _as_4d(out, "out")
    keys4 = keys.reshape(-1, *keys.shape[-3:])  # a copy only if keys' leading dims do not flatten
    if which == "cuda":
        _backend.cuda_ops().rerotate_keys(keys4, old_pos, new_pos, inv_freq, style == "neox", out4)
    else:
        from kvplug import envs
        from kvplug._triton import rope as triton_rope
        triton_rope.rerotate_keys(keys4, old_pos, new_pos, inv_freq, style == "neox", out4,
                                  interpret=envs.triton_interpret())


@_rerotate_keys_op.register_fake
def _(keys, old_pos, new_pos, inv_freq, style, out, backend):
    return None


def rerotate_keys(keys: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq: torch.Tensor,
                  style: str = "neox", out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Dispatcher for rerotate_keys_ref (see there); out may be keys itself (in place)."""
    check_rope_args(keys, old_pos, new_pos, inv_freq, style)
    old_pos, new_pos, inv_freq = old_pos.contiguous(), new_pos.contiguous(), inv_freq.contiguous()
    if out is None:
        out = torch.empty(keys.shape, dtype=keys.dtype, device=keys.device)
    elif out.shape != keys.shape or out.dtype != keys.dtype or out.device != keys.device:
        raise ValueError(f"out of shape {tuple(out.shape)} {out.dtype} on {out.device}: "
                         f"expected {tuple(keys.shape)} {keys.dtype} on {keys.device}")
    elif out.stride(-1) != 1 and out.shape[-1] > 1:
        raise ValueError(f"out of shape {tuple(out.shape)} strides {out.stride()}: head_dim must be contiguous")
    if keys.numel() > 0:
        _rerotate_keys_op(keys, old_pos, new_pos, inv_freq, style, out, backend)
    return out
