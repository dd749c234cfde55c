"""Group-wise integer quantization of canonical KV [L, 2, T, KV, D] (KIVI-style), for the cold tiers.

Keys are quantized per channel: one (scale, zero) for every (layer, group of G tokens, head,
channel); values per token: one (scale, zero) for every (layer, token, head, group of G channels).
A last partial group (T or D not a multiple of G) holds the tokens or channels there are.

Spec, in fp32, for the elements x of one group, with Q = 2**bits - 1:
    zero  = min(x) rounded to fp16 toward -inf
    scale = (max(x) - zero) / Q, rounded to fp16 toward +inf
    code  = clamp(floor((x - zero) / scale + 0.5), 0, Q)          (0 where scale == 0)
    x'    = code * scale + zero (fp32 product, then sum), rounded to the model dtype
Rounding zero down and scale up keeps [zero, zero + Q * scale] over the group's range, so the
round trip is off by at most scale / 2 plus the model dtype's rounding of x': about range / 510
for int8 and range / 30 for int4. A group whose minimum is below -65504, or whose range over Q is
above 65504, has no finite fp16 zero or scale: callers check the meta (kvplug/tiers/codec.py then
does not store the unit).

Encoding (all contiguous):
    codes   uint8 [L, 2, T, KV, C], C = ceil(D * bits / 8): int8 one code per byte; int4 two per byte,
            channel 2j in the low nibble and 2j + 1 in the high one (0 past an odd D)
    k_meta  fp16 [L, ceil(T / G), KV, D, 2]   (scale, zero) of each key group
    v_meta  fp16 [L, T, KV, ceil(D / G), 2]   (scale, zero) of each value group
Bytes per token: 2 * L * KV * C + 4 * L * KV * (D / G + ceil(D / G)), the key groups amortized.

Methods:
    quantize_kv_ref(kv, bits, group) -> QuantKV               the torch spec of quantize_kv
    dequantize_kv_ref(q, bits, group, dtype) -> kv            the torch spec of dequantize_kv
    quantize_kv(kv, bits, group, out=None, backend="auto") -> QuantKV     dispatcher
    dequantize_kv(q, bits, group, dtype, out=None, backend="auto") -> kv  dispatcher
    quant_shapes(L, T, KV, D, bits, group) -> (codes, k_meta, v_meta) shapes
    empty_quant(L, T, KV, D, bits, group, device) -> QuantKV  uninitialised outputs
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kvplug import envs
from kvplug.ops import _backend
from kvplug.ops.kv_layout import DTYPES

BITS = (4, 8)
MAX_GROUP = 4096


class QuantKV(NamedTuple):
    codes: torch.Tensor  # uint8 [L, 2, T, KV, C]
    k_meta: torch.Tensor  # fp16 [L, ceil(T/G), KV, D, 2]
    v_meta: torch.Tensor  # fp16 [L, T, KV, ceil(D/G), 2]


def _ngroups(n: int, group: int) -> int:
    return -(-n // group)


def quant_shapes(L: int, T: int, KV: int, D: int, bits: int, group: int) -> tuple[tuple[int, ...], ...]:
    return ((L, 2, T, KV, _ngroups(D * bits, 8)), (L, _ngroups(T, group), KV, D, 2),
            (L, T, KV, _ngroups(D, group), 2))


def empty_quant(L: int, T: int, KV: int, D: int, bits: int, group: int, device="cpu") -> QuantKV:
    c, k, v = quant_shapes(L, T, KV, D, bits, group)
    return QuantKV(torch.empty(c, dtype=torch.uint8, device=device), torch.empty(k, dtype=torch.float16, device=device),
                   torch.empty(v, dtype=torch.float16, device=device))


def _check_params(bits: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r}: allowed values are {', '.join(map(str, BITS))}")
    if isinstance(group, bool) or not isinstance(group, int) or not 1 <= group <= MAX_GROUP:
        raise ValueError(f"group={group!r}: must be an integer from 1 to {MAX_GROUP}")


def _check_kv(kv: torch.Tensor) -> None:
    if kv.dim() != 5 or kv.shape[1] != 2 or kv.dtype not in DTYPES:
        raise ValueError(f"kv of shape {tuple(kv.shape)} {kv.dtype}: expected [L, 2, T, KV, D] in {DTYPES}")
    if kv.shape[-1] > 1 and kv.stride(-1) != 1:
        raise ValueError(f"kv of shape {tuple(kv.shape)} strides {kv.stride()}: head_dim must be contiguous")


def _check_quant(q: QuantKV, shape: tuple[int, ...], bits: int, group: int, device, name: str = "q") -> None:
    L, _, T, KV, D = shape
    want = quant_shapes(L, T, KV, D, bits, group)
    for part, dtype, size in zip(q, (torch.uint8, torch.float16, torch.float16), want):
        if tuple(part.shape) != size or part.dtype != dtype or part.device != torch.device(device) \
                or not part.is_contiguous():
            raise ValueError(f"{name} parts of shapes {[tuple(p.shape) for p in q]}: expected contiguous {list(want)} "
                             f"(uint8, fp16, fp16) on {device} for kv {tuple(shape)} at {bits} bits, group {group}")


def _shape_of(q: QuantKV, bits: int) -> tuple[int, ...]:
    """The kv shape a QuantKV encodes (D comes from k_meta: int4 codes of D and D + 1 match)."""
    if q.codes.dim() != 5 or q.k_meta.dim() != 5:
        raise ValueError(f"q parts of shapes {[tuple(p.shape) for p in q]}: expected codes [L, 2, T, KV, C] and "
                         "k_meta [L, groups, KV, D, 2]")
    L, _, T, KV, _ = q.codes.shape
    return (L, 2, T, KV, q.k_meta.shape[3])


# ---------------------------------------------------------------- the spec
def round_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """fp32 -> the nearest fp16 at or above x (up) or at or below x (down); inf past fp16's range."""
    h = x.to(torch.float16)  # round to nearest even
    bits = h.view(torch.int16)
    hf = h.float()
    if up:  # x >= 0 here (a scale): one fp16 step up in magnitude
        return torch.where(hf < x, bits + 1, bits).view(torch.float16)
    step = torch.where(hf > 0, bits - 1, bits + 1)  # toward -inf: down in magnitude if positive, else up
    return torch.where(hf > x, step, bits).view(torch.float16)


def _scale_zero(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    zero = round_fp16(mn, up=False)
    scale = round_fp16((mx - zero.float()) / (2 ** bits - 1), up=True)
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    s = scale.float()
    y = torch.floor((x - zero.float()) / torch.where(s > 0, s, 1.0) + 0.5).clamp_(0, 2 ** bits - 1)
    return torch.where(s > 0, y, 0.0).to(torch.uint8)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> [..., ceil(D * bits / 8)]."""
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack(codes: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    if bits == 8:
        return codes
    return torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)[..., :D]


def _padded(x: torch.Tensor, dim: int, n: int, fill: float) -> torch.Tensor:
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    pad = x.new_full((*x.shape[:dim], extra, *x.shape[dim + 1:]), fill)
    return torch.cat([x, pad], dim)


def quantize_kv_ref(kv: torch.Tensor, bits: int, group: int) -> QuantKV:
    """kv [L, 2, T, KV, D] (fp32, fp16 or bf16) -> QuantKV; see the module docstring for the spec."""
    _check_params(bits, group)
    L, _, T, KV, D = kv.shape
    G, ngt, ngd = group, _ngroups(T, group), _ngroups(D, group)
    k, v = kv[:, 0].float(), kv[:, 1].float()  # [L, T, KV, D]
    # keys: groups of tokens -> [L, ngt, G, KV, D]; the padding never wins a min or a max
    kmn = _padded(k, 1, ngt * G, float("inf")).view(L, ngt, G, KV, D).amin(2) if T else k.new_empty(L, 0, KV, D)
    kmx = _padded(k, 1, ngt * G, float("-inf")).view(L, ngt, G, KV, D).amax(2) if T else k.new_empty(L, 0, KV, D)
    ks, kz = _scale_zero(kmn, kmx, bits)
    per_tok = torch.arange(T, device=kv.device) // G
    kq = _codes(k, ks[:, per_tok], kz[:, per_tok], bits)
    # values: groups of channels -> [L, T, KV, ngd, G]
    vmn = _padded(v, 3, ngd * G, float("inf")).view(L, T, KV, ngd, G).amin(4)
    vmx = _padded(v, 3, ngd * G, float("-inf")).view(L, T, KV, ngd, G).amax(4)
    vs, vz = _scale_zero(vmn, vmx, bits)
    per_ch = torch.arange(D, device=kv.device) // G
    vq = _codes(v, vs[..., per_ch], vz[..., per_ch], bits)
    codes = torch.stack([_pack(kq, bits), _pack(vq, bits)], dim=1).contiguous()
    return QuantKV(codes, torch.stack([ks, kz], -1).contiguous(), torch.stack([vs, vz], -1).contiguous())


def dequantize_kv_ref(q: QuantKV, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """QuantKV -> kv [L, 2, T, KV, D] in dtype: code * scale + zero in fp32 (product, then sum)."""
    _check_params(bits, group)
    L, _, T, KV, D = _shape_of(q, bits)
    codes = _unpack(q.codes, bits, D).float()  # [L, 2, T, KV, D]
    per_tok = torch.arange(T, device=codes.device) // group
    per_ch = torch.arange(D, device=codes.device) // group
    km, vm = q.k_meta.float()[:, per_tok], q.v_meta.float()[..., per_ch, :]  # [L, T, KV, D, 2]
    k = codes[:, 0] * km[..., 0] + km[..., 1]
    v = codes[:, 1] * vm[..., 0] + vm[..., 1]
    return torch.stack([k, v], dim=1).to(dtype)


# ---------------------------------------------------------------- the torch backend
# quantize_kv_ref's math on one layer's K or V at a time, over group views instead of per-element
# gathers, in place where it can: the CPU tiers run this on every stored unit. The same fp32
# operations as the spec, so the same codes and values, with three shortcuts that change no
# result: a zero scale becomes +inf (sends (x - zero) / scale to 0, the spec's "0 where scale == 0");
# the clamp is dropped (zero <= x and scale >= (max - zero) / Q keep (x - zero) / scale + 0.5 in
# [0, Q + 1)); floor is the integer conversion's truncation (the operand is >= 0).
def _groups(n: int, group: int) -> list[tuple[int, int]]:
    """(start, length) runs of whole groups, then the partial last group."""
    full = n // group * group
    return [(a, b) for a, b in ((0, full), (full, n - full)) if b > 0]


def _encode_into(x: torch.Tensor, dim: int, bits: int, meta: torch.Tensor) -> torch.Tensor:
    """x fp32 split as [..., n, G, ...] with the G axis at `dim`: meta [..., n, ..., 2] gets the
    groups' (scale, zero); returns the codes, uint8, in x's shape."""
    scale, zero = _scale_zero(x.amin(dim), x.amax(dim), bits)
    meta.copy_(torch.stack([scale, zero], -1))
    s = scale.float()
    s[s == 0] = float("inf")
    return x.sub_(zero.float().unsqueeze(dim)).div_(s.unsqueeze(dim)).add_(0.5).to(torch.int16).to(torch.uint8)


def _store_codes(q: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """uint8 codes [..., D] -> packed bytes into out [..., C]."""
    if bits == 8:
        out.copy_(q)
        return
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    torch.bitwise_or(q[..., 0::2], q[..., 1::2] << 4, out=out)


_TILE_ELEMS = 1 << 18  # fp32 temporaries of a tile stay in cache: the passes are not DRAM-bound


def _tiles(L: int, T: int, row: int, group: int, keys: bool) -> list[tuple[int, int, int, int]]:
    """(l0, l1, t0, n): layers [l0, l1) x tokens [t0, t0 + n) of about _TILE_ELEMS elements (several
    layers of a short unit, token ranges of a long one). Key tiles hold whole token groups, except a
    tile of the partial last group alone."""
    per_layer = T * row
    if 0 < per_layer <= _TILE_ELEMS:
        lc = _TILE_ELEMS // per_layer
        runs = _groups(T, group) if keys else [(0, T)]
        return [(l0, min(L, l0 + lc), t0, n) for l0 in range(0, L, lc) for t0, n in runs]
    step = max(1, _TILE_ELEMS // max(row, 1))
    runs = [(a, min(step, T - a)) for a in range(0, T, step)]
    if keys:
        step = max(1, step // group) * group
        full = T // group * group
        runs = [(a, min(step, full - a)) for a in range(0, full, step)] + ([(full, T - full)] if T > full else [])
    return [(layer, layer + 1, t0, n) for layer in range(L) for t0, n in runs]


def _quantize_torch(kv: torch.Tensor, bits: int, group: int, out: QuantKV) -> None:
    L, _, T, KV, D = kv.shape
    for l0, l1, t0, n in _tiles(L, T, KV * D, group, keys=True):
        g, g0 = min(n, group), t0 // group
        part = kv[l0:l1, 0, t0:t0 + n].to(torch.float32, copy=True).view(l1 - l0, n // g, g, KV, D)
        q = _encode_into(part, 2, bits, out.k_meta[l0:l1, g0:g0 + n // g])
        _store_codes(q.view(l1 - l0, n, KV, D), bits, out.codes[l0:l1, 0, t0:t0 + n])
    for l0, l1, t0, n in _tiles(L, T, KV * D, group, keys=False):
        x = kv[l0:l1, 1, t0:t0 + n].to(torch.float32, copy=True)  # encoded in place
        q = torch.empty(x.shape, dtype=torch.uint8)
        for d0, m in _groups(D, group):
            g = min(m, group)
            part = x[..., d0:d0 + m].reshape(l1 - l0, n, KV, m // g, g)
            meta = out.v_meta[l0:l1, t0:t0 + n, :, d0 // group:d0 // group + m // g]
            q[..., d0:d0 + m] = _encode_into(part, 4, bits, meta).view(l1 - l0, n, KV, m)
        _store_codes(q, bits, out.codes[l0:l1, 1, t0:t0 + n])


def _decode_into(codes: torch.Tensor, meta: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """codes fp32 split at `dim` as in _encode_into; out gets code * scale + zero."""
    m = meta.float().unsqueeze(dim)
    out.copy_(codes.mul_(m[..., 0]).add_(m[..., 1]))


def _dequantize_torch(q: QuantKV, bits: int, group: int, out: torch.Tensor) -> None:
    L, _, T, KV, D = out.shape
    for l0, l1, t0, n in _tiles(L, T, KV * D, group, keys=True):
        g, g0, lc = min(n, group), t0 // group, l1 - l0
        k = _unpack(q.codes[l0:l1, 0, t0:t0 + n], bits, D).float()
        _decode_into(k.view(lc, n // g, g, KV, D), q.k_meta[l0:l1, g0:g0 + n // g], 2,
                     out[l0:l1, 0, t0:t0 + n].unflatten(1, (n // g, g)))
    for l0, l1, t0, n in _tiles(L, T, KV * D, group, keys=False):
        v, lc = _unpack(q.codes[l0:l1, 1, t0:t0 + n], bits, D).float(), l1 - l0
        for d0, m in _groups(D, group):
            g = min(m, group)
            _decode_into(v[..., d0:d0 + m].reshape(lc, n, KV, m // g, g),
                         q.v_meta[l0:l1, t0:t0 + n, :, d0 // group:d0 // group + m // g], 4,
                         out[l0:l1, 1, t0:t0 + n, :, d0:d0 + m].unflatten(-1, (m // g, g)))


# ---------------------------------------------------------------- dispatchers
@torch.library.custom_op("kvplug::quantize_kv", mutates_args=("codes", "k_meta", "v_meta"))
def _quantize_op(kv: torch.Tensor, bits: int, group: int, codes: torch.Tensor, k_meta: torch.Tensor,
                 v_meta: torch.Tensor, backend: str) -> None:
    which = _backend.choose("quantize_kv", kv.device, backend)
    out = QuantKV(codes, k_meta, v_meta)
    if which == "torch":
        _quantize_torch(kv, bits, group, out)
    elif which == "cuda":
        _backend.cuda_ops().quantize_kv(kv, bits, group, codes, k_meta, v_meta)
    else:
        from kvplug._triton import kv_quant as tk
        tk.quantize_kv(kv, bits, group, out, interpret=envs.triton_interpret())


@_quantize_op.register_fake
def _(kv, bits, group, codes, k_meta, v_meta, backend):
    return None


def quantize_kv(kv: torch.Tensor, bits: int, group: int, out: QuantKV | None = None,
                backend: str = "auto") -> QuantKV:
    """Dispatcher for quantize_kv_ref (see there); kv may be strided with head_dim contiguous."""
    _check_params(bits, group)
    _check_kv(kv)
    L, _, T, KV, D = kv.shape
    if out is None:
        out = empty_quant(L, T, KV, D, bits, group, kv.device)
    _check_quant(out, tuple(kv.shape), bits, group, kv.device, "out")
    if kv.numel() > 0:
        _quantize_op(kv, bits, group, out.codes, out.k_meta, out.v_meta, backend)
    return out


@torch.library.custom_op("kvplug::dequantize_kv", mutates_args=("out",))
def _dequantize_op(codes: torch.Tensor, k_meta: torch.Tensor, v_meta: torch.Tensor, bits: int, group: int,
                   out: torch.Tensor, backend: str) -> None:
    which = _backend.choose("dequantize_kv", codes.device, backend)
    q = QuantKV(codes, k_meta, v_meta)
    if which == "torch":
        _dequantize_torch(q, bits, group, out)
    elif which == "cuda":
        _backend.cuda_ops().dequantize_kv(codes, k_meta, v_meta, bits, group, out)
    else:
        from kvplug._triton import kv_quant as tk
        tk.dequantize_kv(q, bits, group, out, interpret=envs.triton_interpret())


@_dequantize_op.register_fake
def _(codes, k_meta, v_meta, bits, group, out, backend):
    return None


def dequantize_kv(q: QuantKV, bits: int, group: int, dtype: torch.dtype, out: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Dispatcher for dequantize_kv_ref (see there); out may be strided with head_dim contiguous."""
    _check_params(bits, group)
    q = QuantKV(*q)
    shape = _shape_of(q, bits)
    _check_quant(q, shape, bits, group, q.codes.device)
    if out is None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype}: allowed are {DTYPES}")
        out = torch.empty(shape, dtype=dtype, device=q.codes.device)
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device != q.codes.device:
        raise ValueError(f"out of shape {tuple(out.shape)} {out.dtype} on {out.device}: expected {shape} {dtype} "
                         f"on {q.codes.device}")
    _check_kv(out)
    if out.numel() > 0:
        _dequantize_op(q.codes, q.k_meta, q.v_meta, bits, group, out, backend)
    return out
