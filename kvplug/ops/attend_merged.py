"""Attention over merged entries: softmax of q.k * scale plus a per-entry bias, GQA aware,
returning the output and its log-sum-exp (so partial attentions over disjoint entry sets
combine exactly).

The bias is what makes a merged cache stand in for the full one (merge_clusters gives it):
an entry with bias log(n) receives exactly the softmax mass of n identical copies of it,
an exact token has bias 0, and -inf removes an entry (padding, an empty cluster).

Functions:
    attend_merged_ref(q, keys, values, bias, scale)           torch spec (fp32 math)
    attend_merged(q, keys, values, bias, scale, backend)      dispatcher (cuda -> triton -> torch)

Backends: torch and triton (kvplug._C registers no attend_merged: with backend="auto" a CUDA
tensor runs the Triton kernel).
"""
import math

import torch

from kvplug import envs
from kvplug.ops import _backend

OP = "attend_merged"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def attend_merged_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                      scale: float | None = None):
    """Biased softmax attention of every query head over its kv head's entries.

    q [Q, Hq, D] fp16/bf16/fp32; keys, values [Hkv, E, D] of one fp16/bf16/fp32 dtype (may
    differ from q's); bias fp32 [Hkv, E]: log(cluster size) for a merged entry, 0 for an
    exact token, -inf for an entry to ignore. All on one device; D >= 1.
    scale defaults to 1/sqrt(D). Query head h reads kv head h // (Hq // Hkv); ValueError
    when Hq % Hkv != 0.
        logits[q, h, e] = scale * (q[q, h] . keys[g, e]) + bias[g, e]      (fp32, g = h // G)
        out[q, h]  = softmax_e(logits[q, h]) @ values[g]                     fp32 [Q, Hq, D]
        lse[q, h]  = logsumexp_e(logits[q, h])                               fp32 [Q, Hq]
    A row whose logits are all -inf (every bias -inf, or E == 0) gives out 0 and lse -inf,
    never NaN. Bias +inf or NaN, and non-finite keys/values, are outside the contract.
    Returns (out, lse).
    """
    _check(q, keys, values, bias)
    s = resolve_scale(scale, q.shape[2])
    Q, Hq, D = q.shape
    Hkv, E, _ = keys.shape
    G = Hq // Hkv
    qf = q.float().reshape(Q, Hkv, G, D)
    logits = torch.einsum("qkgd,ked->qkge", qf, keys.float()) * s + bias.float()[None, :, None, :]
    lse = torch.logsumexp(logits, dim=-1)  # -inf where every logit is -inf (or E == 0)
    p = torch.exp(logits - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))  # 0 weight, not NaN
    out = torch.einsum("qkge,ked->qkgd", p, values.float())
    return out.reshape(Q, Hq, D), lse.reshape(Q, Hq)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> None:
    if q.dim() != 3 or keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(f"attend_merged: q {tuple(q.shape)} must be [Q, Hq, D] and keys {tuple(keys.shape)}, "
                         f"values {tuple(values.shape)} both [Hkv, E, D]")
    Q, Hq, D = q.shape
    Hkv, E, Dk = keys.shape
    if Dk != D or D < 1 or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attend_merged: q {tuple(q.shape)} and keys {tuple(keys.shape)}: head dims must match "
                         "(>= 1) and Hq must be a multiple of Hkv")
    if bias.shape != (Hkv, E) or bias.dtype != torch.float32:
        raise ValueError(f"attend_merged: bias {tuple(bias.shape)} {bias.dtype} must be fp32 [Hkv={Hkv}, E={E}]")
    if q.dtype not in FLOATS or keys.dtype not in FLOATS or values.dtype != keys.dtype:
        raise ValueError(f"attend_merged: dtypes q {q.dtype}, keys {keys.dtype}, values {values.dtype}: "
                         "must be fp16/bf16/fp32, keys and values one dtype")
    if not (q.device == keys.device == values.device == bias.device):
        raise ValueError(f"attend_merged: q on {q.device}, keys on {keys.device}, values on {values.device}, "
                         f"bias on {bias.device}: must share one device")


def _unit_d(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any strides but need unit stride along D.
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("kvplug::attend_merged", mutates_args=())
def _attend_merged_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                      scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _backend.choose(OP, q.device, backend)
    if impl == "torch":
        out, lse = attend_merged_ref(q, keys, values, bias, scale)
        return out.contiguous(), lse.contiguous()
    # No CUDA kernel is registered (choose() refuses "cuda" for this op): triton here.
    q, keys, values = _unit_d(q), _unit_d(keys), _unit_d(values)
    from kvplug._triton.attend_merged import attend_merged_triton

    return attend_merged_triton(q, keys, values, bias, scale, interpret=envs.triton_interpret())


@_attend_merged_op.register_fake
def _(q, keys, values, bias, scale, backend):
    Q, Hq, D = q.shape
    return q.new_empty((Q, Hq, D), dtype=torch.float32), q.new_empty((Q, Hq), dtype=torch.float32)


def attend_merged(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                  scale: float | None = None, backend: str = "auto"):
    """Same contract as attend_merged_ref; `backend` is auto|cuda|triton|torch.

    Triton computes q.k with fp32 accumulation (exact products when q and keys share fp16/bf16,
    else in fp32) and, as flash attention does, rounds the softmax weights to the values'
    dtype for the weights @ values product when values are fp16/bf16 (fp32 accumulation): out
    then matches the reference to that dtype's precision, lse to fp32's.
    """
    _check(q, keys, values, bias)
    return _attend_merged_op(q, keys, values, bias, resolve_scale(scale, q.shape[2]), backend)
