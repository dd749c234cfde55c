"""Compressed KV in the cold tiers: a unit's payload quantized (kvplug.ops.kv_quant, KIVI-style) on its
way to disk or the remote store, and restored to the same payload bytes on its way back.

A codec needs the unit's KV as canonical [L, 2, T, KV, D] tokens: a KVView per layout tag says where
they are in the payload (canonical block rows and chunks: a reshape; opaque engine blocks: a gather by
the backend's own element order; see kvplug/connector/kv_views.py) and what follows them (a chunk's
cluster sidecar, kept as it is). The stored unit's layout tag is the payload's tag + "|" + the codec's
tag, so units of different codecs (or none) never mix: another codec's unit is a foreign unit, a miss
counted in the store's corruption counter. A unit whose layout has no view, or whose KV has a group
that fp16 scales cannot hold (a minimum below -65504), is not stored at all: the byte budgets count
every unit at its encoded size.

Encoded unit, all integers little-endian:
    header  32 bytes: b"KVQ1", bits u8, dtype code u8, group u16, L u32, T u32, KV u32, D u32, tail bytes u64
    k_meta  fp16 [L, ceil(T/G), KV, D, 2]    v_meta fp16 [L, T, KV, ceil(D/G), 2]
    codes   uint8 [L, 2, T, KV, ceil(D * bits / 8)]
    tail    the payload's bytes after its KV, unchanged
Every field is checked against the view on decode; the tiers' CRC-32 has checked every byte already.

    CODECS                              "none", "int8", "int4"
    make_codec(name) -> Codec | None    None for "none"
    Codec.tag / .encoded_nbytes(L, T, KV, D, tail_nbytes)
    TokensView(L, KV, D, dtype, tokens=None, tail_nbytes=None)   canonical KV (+ a tail) as the payload
    PermutedView(L, KV, D, dtype, tokens, k_index, v_index)      opaque blocks: element order of K and V
    UnitCodec(codec, views, sharers=1)  the codec at a store's boundary; with sharers=2 (disk and remote
                                        stores), a payload put to both is encoded once:
        .stored_layout(layout)          the tag a stored unit carries
        .encode(payload, layout)        the stored bytes, or None (no view, a bad size, non-finite scales)
        .decode(data, layout)           the payload, or CorruptUnit
"""
from __future__ import annotations

import math
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

import torch

from kvplug.ops.kv_quant import QuantKV, dequantize_kv, quant_shapes, quantize_kv
from kvplug.tiers.disk_format import CorruptUnit

CODECS = ("none", "int8", "int4")
_PARAMS = {"int8": (8, 64), "int4": (4, 32)}  # bits, group (tokens for keys, channels for values)
_HEADER = struct.Struct("<4sBBHIIIIQ")
_MAGIC = b"KVQ1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MEMO_BYTES = 256 << 20  # encoded units kept for the other store that will ask for the same payload


@dataclass(frozen=True)
class Codec:
    name: str
    bits: int
    group: int

    @property
    def tag(self) -> str:
        return f"kvq-{self.name}-g{self.group}-v1"

    def parts(self, L: int, T: int, KV: int, D: int) -> tuple[int, int, int]:
        """Bytes of k_meta, v_meta and codes."""
        c, k, v = quant_shapes(L, T, KV, D, self.bits, self.group)
        return 2 * math.prod(k), 2 * math.prod(v), math.prod(c)

    def encoded_nbytes(self, L: int, T: int, KV: int, D: int, tail_nbytes: int = 0) -> int:
        return _HEADER.size + sum(self.parts(L, T, KV, D)) + tail_nbytes


def make_codec(name: str) -> Codec | None:
    if name not in CODECS:
        raise ValueError(f"codec {name!r}: allowed values are {', '.join(CODECS)}")
    return None if name == "none" else Codec(name, *_PARAMS[name])


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class TokensView:
    """A payload that is canonical KV [L, 2, T, KV, D] in `dtype`, then `tail_nbytes(T)` other bytes:
    T fixed (`tokens`, a block row) or found from the size (a chunk)."""

    def __init__(self, L: int, KV: int, D: int, dtype: torch.dtype, tokens: int | None = None,
                 tail_nbytes: Callable[[int], int] | None = None):
        self.L, self.KV, self.D, self.dtype, self.fixed = L, KV, D, dtype, tokens
        self._tail = tail_nbytes or (lambda T: 0)
        self.token_bytes = 2 * L * KV * D * _itemsize(dtype)

    def tail_nbytes(self, T: int) -> int:
        return self._tail(T)

    def tokens(self, nbytes: int) -> int | None:
        """T of a payload of nbytes, or None when no token count gives that size."""
        if self.fixed is not None:
            return self.fixed if self._size(self.fixed) == nbytes else None
        T = nbytes // self.token_bytes
        while T > 0 and self._size(T) > nbytes:  # a tail grows with T
            T -= 1
        return T if T > 0 and self._size(T) == nbytes else None

    def _size(self, T: int) -> int:
        return T * self.token_bytes + self._tail(T)

    def kv(self, payload: torch.Tensor, T: int) -> torch.Tensor:
        return payload[:T * self.token_bytes].view(self.dtype).view(self.L, 2, T, self.KV, self.D)

    def empty(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a payload to fill, the canonical KV inside it to decode into)."""
        payload = torch.empty(self._size(T), dtype=torch.uint8)
        return payload, self.kv(payload, T)

    def finish(self, payload: torch.Tensor, kv: torch.Tensor) -> None:
        return  # kv is the payload's own memory


class PermutedView:
    """Opaque engine blocks (one block of every layer, layers back to back, each E elements of
    `dtype`) whose K and V elements sit where the backend's write op put them: k_index[t, h*D + d]
    is the element of token t, head h, dim d of K inside a layer's block (v_index for V). Both
    together must cover the block exactly once (checked), so the bytes round-trip. An order that is
    a strided layout (vLLM's CPU block [KV, T, 2D] is) is copied through strided views, any other
    (an ISA-packed block) through an index gather, about 40x slower here."""

    def __init__(self, L: int, KV: int, D: int, dtype: torch.dtype, tokens: int, k_index: torch.Tensor,
                 v_index: torch.Tensor):
        self.L, self.KV, self.D, self.dtype, self.fixed = L, KV, D, dtype, tokens
        self.elems = 2 * tokens * KV * D
        both = torch.cat([k_index.flatten(), v_index.flatten()]).long().cpu()
        if both.numel() != self.elems or not torch.equal(both.sort().values, torch.arange(self.elems)):
            raise ValueError(f"k_index {tuple(k_index.shape)} and v_index {tuple(v_index.shape)} do not cover a "
                             f"{self.elems}-element block exactly once")
        self._index = both  # K then V, each [tokens * KV * D] in canonical order
        self._inverse = torch.empty_like(both)
        self._inverse[both] = torch.arange(self.elems)
        shape = (tokens, KV, D)
        self._strided = [_as_strides(i.view(shape).long().cpu()) for i in (k_index, v_index)]
        if None in self._strided:
            self._strided = None

    def tail_nbytes(self, T: int) -> int:
        return 0

    def tokens(self, nbytes: int) -> int | None:
        return self.fixed if nbytes == self.L * self.elems * _itemsize(self.dtype) else None

    def _halves(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        """K and V of every layer as strided views [L, T, KV, D] of blocks [L, E]."""
        return [blocks.as_strided((self.L, self.fixed, self.KV, self.D), (self.elems, *st),
                                  blocks.storage_offset() + base) for base, st in self._strided]

    def kv(self, payload: torch.Tensor, T: int) -> torch.Tensor:
        blocks = payload.view(self.dtype).view(self.L, self.elems)
        if self._strided is not None:
            return torch.stack(self._halves(blocks), dim=1)
        return blocks.index_select(1, self._index).view(self.L, 2, T, self.KV, self.D)

    def empty(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        payload = torch.empty(self.L * self.elems * _itemsize(self.dtype), dtype=torch.uint8)
        return payload, torch.empty((self.L, 2, T, self.KV, self.D), dtype=self.dtype)

    def finish(self, payload: torch.Tensor, kv: torch.Tensor) -> None:
        blocks = payload.view(self.dtype).view(self.L, self.elems)
        if self._strided is not None:
            for half, src in zip(self._halves(blocks), (kv[:, 0], kv[:, 1])):
                half.copy_(src)
        else:
            torch.index_select(kv.reshape(self.L, self.elems), 1, self._inverse, out=blocks)


def _as_strides(index: torch.Tensor) -> tuple[int, tuple[int, int, int]] | None:
    """(base, strides) when index[t, h, d] == base + t*st + h*sh + d*sd for all t, h, d; else None."""
    base = int(index[0, 0, 0])
    st = [int(index[1, 0, 0]) - base if index.shape[0] > 1 else 0,
          int(index[0, 1, 0]) - base if index.shape[1] > 1 else 0,
          int(index[0, 0, 1]) - base if index.shape[2] > 1 else 0]
    grid = [torch.arange(n).view(*(n if i == j else 1 for j in range(3))) * s
            for i, (n, s) in enumerate(zip(index.shape, st))]
    return (base, tuple(st)) if torch.equal(base + grid[0] + grid[1] + grid[2], index) else None


class UnitCodec:
    """One codec at a store's boundary. `views` (layout tag -> KVView) may be shared and filled later
    (the chunk view exists once the blender does); a layout without a view is not stored. The writer
    threads of `sharers` stores may call encode at once: with more than one, the one that comes second
    for a payload (the same tensor object) gets the first one's bytes."""

    def __init__(self, codec: Codec, views: MutableMapping[str, object], sharers: int = 1):
        self.codec, self.views, self.sharers = codec, views, sharers
        self._lock = threading.Lock()  # one encode at a time: the second caller finds the memo
        self._memo: OrderedDict[tuple[int, str], tuple] = OrderedDict()  # (id, layout) -> (ref, bytes or None)

    def stored_layout(self, layout: str) -> str:
        return f"{layout}|{self.codec.tag}"

    def encode(self, payload: torch.Tensor, layout: str) -> torch.Tensor | None:
        if self.sharers < 2:
            return self._encode(payload, layout)
        key = (id(payload), layout)
        with self._lock:
            hit = self._memo.pop(key, None)
            if hit is not None and hit[0]() is payload:
                return hit[1]
            out = self._encode(payload, layout)
            self._memo[key] = (weakref.ref(payload), out)
            while len(self._memo) > 1 and sum(0 if v[1] is None else v[1].numel() for v in self._memo.values()) \
                    > _MEMO_BYTES:
                self._memo.popitem(last=False)
        return out

    def _encode(self, payload: torch.Tensor, layout: str) -> torch.Tensor | None:
        view = self.views.get(layout)
        T = None if view is None else view.tokens(payload.numel())
        if T is None:
            return None
        c, tail = self.codec, view.tail_nbytes(T)
        out = torch.empty(c.encoded_nbytes(view.L, T, view.KV, view.D, tail), dtype=torch.uint8)
        q = self._parts(out, view, T)
        quantize_kv(view.kv(payload, T), c.bits, c.group, out=q)
        if not (torch.isfinite(q.k_meta).all() and torch.isfinite(q.v_meta).all()):
            return None  # a group past fp16's range: not representable by this codec
        out[:_HEADER.size] = torch.frombuffer(bytearray(_HEADER.pack(
            _MAGIC, c.bits, _DTYPES.index(view.dtype), c.group, view.L, T, view.KV, view.D, tail)), dtype=torch.uint8)
        if tail:
            out[-tail:] = payload[-tail:]
        return out

    def decode(self, data: torch.Tensor, layout: str) -> torch.Tensor:
        view = self.views.get(layout)
        if view is None:
            raise CorruptUnit(f"no KV view for layout {layout!r} on this worker")
        T, tail = self._check_header(data, view)
        payload, kv = view.empty(T)
        try:
            dequantize_kv(self._parts(data, view, T), self.codec.bits, self.codec.group, view.dtype, out=kv)
        except (ValueError, RuntimeError) as e:  # the header was checked: a bug, but still a miss, never a crash
            raise CorruptUnit(f"cannot decode: {e}") from e
        view.finish(payload, kv)
        if tail:
            payload[-tail:] = data[-tail:]
        return payload

    def _check_header(self, data: torch.Tensor, view) -> tuple[int, int]:
        if data.numel() < _HEADER.size:
            raise CorruptUnit(f"encoded unit of {data.numel()} bytes is shorter than its header")
        magic, bits, dt, group, L, T, KV, D, tail = _HEADER.unpack(data[:_HEADER.size].numpy().tobytes())
        c = self.codec
        want = (_MAGIC, c.bits, c.group, view.L, view.KV, view.D, _DTYPES.index(view.dtype))
        if (magic, bits, group, L, KV, D, dt) != want:
            raise CorruptUnit(f"encoded header {(magic, bits, group, L, KV, D, dt)} != {want}")
        if (view.fixed is not None and T != view.fixed) or T <= 0 or tail != view.tail_nbytes(T):
            raise CorruptUnit(f"encoded header says {T} tokens and a {tail}-byte tail: not a unit of this view")
        if data.numel() != c.encoded_nbytes(L, T, KV, D, tail):
            raise CorruptUnit(f"encoded unit of {data.numel()} bytes, its header needs "
                              f"{c.encoded_nbytes(L, T, KV, D, tail)}")
        return T, tail

    def _parts(self, buf: torch.Tensor, view, T: int) -> QuantKV:
        """k_meta, v_meta and codes as views of an encoded unit's bytes."""
        c = self.codec
        shapes = quant_shapes(view.L, T, view.KV, view.D, c.bits, c.group)
        kb, vb, cb = c.parts(view.L, T, view.KV, view.D)
        a = _HEADER.size
        k_meta = buf[a:a + kb].view(torch.float16).view(shapes[1])
        v_meta = buf[a + kb:a + kb + vb].view(torch.float16).view(shapes[2])
        codes = buf[a + kb + vb:a + kb + vb + cb].view(shapes[0])
        return QuantKV(codes, k_meta, v_meta)
