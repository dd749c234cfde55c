"""Group-wise int8/int4 quantization of canonical KV (Triton); the spec is kvplug/ops/kv_quant.py.

Methods:
    round_fp16(x, UP)                jit: fp32 -> fp16 rounded toward +inf (UP) or -inf
    scale_zero(mn, mx, QF)           jit: fp32 values of the fp16 (scale, zero) of groups
    encode(x, s, z, QF)              jit: codes of a tile (int32, 0 where s == 0)
    quantize_kv(kv, bits, group, out)   launcher: kv [L, 2, T, KV, D] (head_dim contiguous) -> QuantKV out
    dequantize_kv(q, bits, group, out)  launcher: QuantKV -> out [L, 2, T, KV, D] (head_dim contiguous)

Tiles are [tokens, byte columns]: an int8 column is one channel, an int4 column the channel pair
(2j, 2j + 1), loaded as two tiles (even and odd channels) and packed low | high << 4.
Keys: one program per (token group, layer x head) reduces its tile over tokens. Values: one
program per (token tile, layer x head) loops over the channel groups of its rows.
"""
import triton
import triton.language as tl


@triton.jit
def round_fp16(x, UP: tl.constexpr):
    h = x.to(tl.float16)  # round to nearest even
    bits = h.to(tl.int16, bitcast=True)
    hf = h.to(tl.float32)
    if UP:  # x >= 0 (a scale)
        out = tl.where(hf < x, bits + 1, bits)
    else:  # toward -inf: smaller magnitude if positive, larger if negative (or -0)
        out = tl.where(hf > x, tl.where(hf > 0, bits - 1, bits + 1), bits)
    return out.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def scale_zero(mn, mx, QF):
    zero = round_fp16(mn, False)
    scale = round_fp16(tl.div_rn(mx - zero, QF), True)
    return scale, zero


@triton.jit
def encode(x, s, z, QF):
    pos = s > 0
    y = tl.floor(tl.div_rn(x - z, tl.where(pos, s, 1.0)) + 0.5)
    y = tl.minimum(tl.maximum(y, 0.0), QF)
    return tl.where(pos, y, 0.0).to(tl.int32)


@triton.jit
def _key_columns(src, meta, m, d, D, QF):
    """One tile of key channels: per-channel (scale, zero) over the tile's tokens, stored at
    meta + 2 * d; returns the codes (0 where masked)."""
    x = tl.load(src + d[None, :], mask=m, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(m, x, float("inf")), axis=0)
    mx = tl.max(tl.where(m, x, float("-inf")), axis=0)
    s, z = scale_zero(mn, mx, QF)
    dm = d < D
    tl.store(meta + 2 * d, s.to(tl.float16), mask=dm)
    tl.store(meta + 2 * d + 1, z.to(tl.float16), mask=dm)
    return tl.where(m, encode(x, s[None, :], z[None, :], QF), 0)


@triton.jit
def _quant_keys_kernel(kv_ptr, codes_ptr, meta_ptr, T, KV, D, C, G, NGT, s_l, s_t, s_h,
                       PACK: tl.constexpr, QF: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    g = tl.program_id(0)
    lh = tl.program_id(1)
    l, h = (lh // KV).to(tl.int64), (lh % KV).to(tl.int64)
    i = tl.arange(0, BLOCK_G)
    t = g * G + i
    tm = (i < G) & (t < T)
    j = tl.arange(0, BLOCK_C)
    src = kv_ptr + l * s_l + h * s_h + t.to(tl.int64)[:, None] * s_t
    meta = meta_ptr + ((l * NGT + g) * KV + h) * D * 2
    d0 = j
    if PACK:
        d0 = 2 * j
    q = _key_columns(src, meta, tm[:, None] & (d0 < D)[None, :], d0, D, QF)
    if PACK:
        d1 = d0 + 1
        q = q | (_key_columns(src, meta, tm[:, None] & (d1 < D)[None, :], d1, D, QF) << 4)
    row = ((l * 2 * T + t.to(tl.int64)) * KV + h) * C  # K is index 0 of the K/V dim
    tl.store(codes_ptr + row[:, None] + j[None, :], q.to(tl.uint8), mask=tm[:, None] & (j < C)[None, :])


@triton.jit
def _group_range(x, inside, mn, mx):
    mn = tl.minimum(mn, tl.min(tl.where(inside, x, float("inf")), axis=1))
    mx = tl.maximum(mx, tl.max(tl.where(inside, x, float("-inf")), axis=1))
    return mn, mx


@triton.jit
def _quant_values_kernel(kv_ptr, codes_ptr, meta_ptr, T, KV, D, C, G, NGD, s_l, s_w, s_t, s_h,
                         PACK: tl.constexpr, QF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    lh = tl.program_id(1)
    l, h = (lh // KV).to(tl.int64), (lh % KV).to(tl.int64)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tm = t < T
    j = tl.arange(0, BLOCK_C)
    d0 = j
    if PACK:
        d0 = 2 * j
    d1 = d0 + 1
    src = kv_ptr + l * s_l + s_w + h * s_h + t[:, None] * s_t
    m0 = tm[:, None] & (d0 < D)[None, :]
    x0 = tl.load(src + d0[None, :], mask=m0, other=0.0).to(tl.float32)
    m1 = tm[:, None] & (d1 < D)[None, :]
    x1 = x0
    if PACK:
        x1 = tl.load(src + d1[None, :], mask=m1, other=0.0).to(tl.float32)
    s0 = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    z0, s1, z1 = s0, s0, s0
    meta = meta_ptr + ((l * T + t) * KV + h) * NGD * 2
    for gi in range(NGD):
        in0 = ((d0 // G) == gi)[None, :] & m0
        mn, mx = _group_range(x0, in0, tl.full([BLOCK_T], float("inf"), tl.float32),
                              tl.full([BLOCK_T], float("-inf"), tl.float32))
        if PACK:
            in1 = ((d1 // G) == gi)[None, :] & m1
            mn, mx = _group_range(x1, in1, mn, mx)
        s, z = scale_zero(mn, mx, QF)
        tl.store(meta + 2 * gi, s.to(tl.float16), mask=tm)
        tl.store(meta + 2 * gi + 1, z.to(tl.float16), mask=tm)
        s0 = tl.where(in0, s[:, None], s0)
        z0 = tl.where(in0, z[:, None], z0)
        if PACK:
            s1 = tl.where(in1, s[:, None], s1)
            z1 = tl.where(in1, z[:, None], z1)
    q = tl.where(m0, encode(x0, s0, z0, QF), 0)
    if PACK:
        q = q | (tl.where(m1, encode(x1, s1, z1, QF), 0) << 4)
    row = (((l * 2 + 1) * T + t) * KV + h) * C
    tl.store(codes_ptr + row[:, None] + j[None, :], q.to(tl.uint8), mask=tm[:, None] & (j < C)[None, :])


@triton.jit
def _decode_columns(q, d, t, m, meta_ptr, l, h, T, KV, D, G, NGT, NGD, IS_KEY: tl.constexpr):
    if IS_KEY:
        at = (((l * NGT + t[:, None] // G) * KV + h) * D + d[None, :]) * 2
    else:
        at = (((l * T + t[:, None]) * KV + h) * NGD + d[None, :] // G) * 2
    s = tl.load(meta_ptr + at, mask=m, other=0.0).to(tl.float32)
    z = tl.load(meta_ptr + at + 1, mask=m, other=0.0).to(tl.float32)
    return q.to(tl.float32) * s + z


@triton.jit
def _dequant_kernel(codes_ptr, meta_ptr, out_ptr, T, KV, D, C, G, NGT, NGD, s_l, s_w, s_t, s_h,
                    IS_KEY: tl.constexpr, PACK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    lh = tl.program_id(1)
    l, h = (lh // KV).to(tl.int64), (lh % KV).to(tl.int64)
    w = 1
    if IS_KEY:
        w = 0
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tm = t < T
    j = tl.arange(0, BLOCK_C)
    row = (((l * 2 + w) * T + t) * KV + h) * C
    c = tl.load(codes_ptr + row[:, None] + j[None, :], mask=tm[:, None] & (j < C)[None, :], other=0).to(tl.int32)
    dst = out_ptr + l * s_l + w * s_w + h * s_h + t[:, None] * s_t
    d0 = j
    q0 = c
    if PACK:
        d0 = 2 * j
        q0 = c & 15
    m0 = tm[:, None] & (d0 < D)[None, :]
    x0 = _decode_columns(q0, d0, t, m0, meta_ptr, l, h, T, KV, D, G, NGT, NGD, IS_KEY)
    tl.store(dst + d0[None, :], x0.to(out_ptr.dtype.element_ty), mask=m0)
    if PACK:
        d1 = d0 + 1
        m1 = tm[:, None] & (d1 < D)[None, :]
        x1 = _decode_columns(c >> 4, d1, t, m1, meta_ptr, l, h, T, KV, D, G, NGT, NGD, IS_KEY)
        tl.store(dst + d1[None, :], x1.to(out_ptr.dtype.element_ty), mask=m1)


def _block_t(num_tokens: int, interpret: bool) -> int:
    cap = 64 if interpret else 16
    return max(1, min(cap, triton.next_power_of_2(max(num_tokens, 1))))


def quantize_kv(kv, bits: int, group: int, out, interpret: bool = False):
    """kv [L, 2, T, KV, D], head_dim contiguous (checked by the caller); fills out (QuantKV)."""
    L, _, T, KV, D = kv.shape
    if L * T * KV * D == 0:
        return
    C = out.codes.shape[-1]
    pack, qf = bits == 4, float(2 ** bits - 1)
    ngt, ngd = -(-T // group), -(-D // group)
    bc = triton.next_power_of_2(C)
    s_l, s_w, s_t, s_h = kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)
    _quant_keys_kernel[(ngt, L * KV)](kv, out.codes, out.k_meta, T, KV, D, C, group, ngt, s_l, s_t, s_h,
                                      PACK=pack, QF=qf, BLOCK_G=triton.next_power_of_2(group), BLOCK_C=bc)
    bt = _block_t(T, interpret)
    _quant_values_kernel[(triton.cdiv(T, bt), L * KV)](kv, out.codes, out.v_meta, T, KV, D, C, group, ngd,
                                                       s_l, s_w, s_t, s_h, PACK=pack, QF=qf, BLOCK_T=bt, BLOCK_C=bc)


def dequantize_kv(q, bits: int, group: int, out, interpret: bool = False):
    """q: QuantKV of out's shape (checked by the caller); out [L, 2, T, KV, D], head_dim contiguous."""
    L, _, T, KV, D = out.shape
    if L * T * KV * D == 0:
        return
    C = q.codes.shape[-1]
    ngt, ngd = -(-T // group), -(-D // group)
    bt, bc = _block_t(T, interpret), triton.next_power_of_2(C)
    strides = (out.stride(0), out.stride(1), out.stride(2), out.stride(3))
    for is_key, meta in ((True, q.k_meta), (False, q.v_meta)):
        _dequant_kernel[(triton.cdiv(T, bt), L * KV)](q.codes, meta, out, T, KV, D, C, group, ngt, ngd, *strides,
                                                      IS_KEY=is_key, PACK=bits == 4, BLOCK_T=bt, BLOCK_C=bc)
