"""RoPE re-rotation of keys (Triton): moving a key from position p to q is one rotation
by (q - p) * inv_freq, because RoPE rotations compose.

Methods:
    rope_tile(delta, inv_freq_ptr, d, HALF, NEOX)  jit: cos, sin, sign, partner dim, rotate mask
    rotate(x, xp, c, s, sign, rot)                 jit: fp32 rotated tile (x where not rotated)
    rerotate_keys(keys, old_pos, new_pos, inv_freq, neox, out)  launcher, keys/out [N, T, H, D]

Rotation as one formula for every dim d of a head (R = 2 * HALF rotated dims):
    y[d] = x[d] * cos(a[f(d)]) + sign(d) * x[partner(d)] * sin(a[f(d)])   for d < R
    y[d] = x[d]                                                              for d >= R
neox pairs d with d +- HALF (f(d) = d mod HALF, sign - on the first half); gptj pairs
2i with 2i+1 (f(d) = d // 2, sign - on even d).
"""
import triton
import triton.language as tl

# 2*pi split so that k * _TWO_PI_HI is exact in fp32 for |k| < 2**16 (Cody-Waite). Globals
# read by @triton.jit code must be tl.constexpr (the interpreter does not enforce it).
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(0.0019353071795864769)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def rope_tile(delta, inv_freq_ptr, d, HALF: tl.constexpr, NEOX: tl.constexpr):
    """delta: int64 [BT] position shifts; d: int32 [BD] dims. Returns c, s [BT, BD] fp32,
    sign, partner [BD] and rot [BD] (dims that rotate)."""
    rot = d < 2 * HALF
    if NEOX:
        first = d < HALF
        fidx = tl.where(first, d, d - HALF)
        partner = tl.where(first, d + HALF, d - HALF)
        sign = tl.where(first, -1.0, 1.0)
    else:
        fidx = d // 2
        partner = d ^ 1
        sign = tl.where((d % 2) == 0, -1.0, 1.0)
    freq = tl.load(inv_freq_ptr + fidx, mask=rot, other=0.0)
    # The angle is the fp32 product of the integer shift and inv_freq (the spec); it is
    # then reduced to [-pi, pi] because GPU sin/cos may be approximate for large angles.
    angle = delta.to(tl.float32)[:, None] * freq[None, :]
    k = tl.floor(angle * _INV_TWO_PI + 0.5)
    r = tl.fma(-k, _TWO_PI_HI, angle)
    r = tl.fma(-k, _TWO_PI_LO, r)
    return tl.cos(r), tl.sin(r), sign, partner, rot


@triton.jit
def rotate(x, xp, c, s, sign, rot):
    """x, xp: [BT, BD] tile and its partner tile; rot may be [BD] or [BT, BD]."""
    xf = x.to(tl.float32)
    y = xf * c + sign[None, :] * xp.to(tl.float32) * s
    return tl.where(rot, y, xf)


@triton.jit
def _rerotate_kernel(x_ptr, y_ptr, old_ptr, new_ptr, inv_freq_ptr, T, H,
                     sxn, sxt, sxh, syn, syt, syh,
                     D: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (token tiles, N). One program owns whole rows (all heads of its tokens), so
    # in-place use (y is x) is safe: every element is read before it is written.
    n = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    delta = tl.load(new_ptr + t, mask=tmask, other=0) - tl.load(old_ptr + t, mask=tmask, other=0)
    d = tl.arange(0, BLOCK_D)
    c, s, sign, partner, rot = rope_tile(delta, inv_freq_ptr, d, HALF, NEOX)
    m = tmask[:, None] & (d < D)[None, :]
    t64 = t.to(tl.int64)[:, None]
    xrow = x_ptr + n * sxn + t64 * sxt
    yrow = y_ptr + n * syn + t64 * syt
    for h in range(H):
        x = tl.load(xrow + h * sxh + d[None, :], mask=m, other=0.0)
        xp = tl.load(xrow + h * sxh + partner[None, :], mask=m & rot[None, :], other=0.0)
        y = rotate(x, xp, c, s, sign, rot[None, :])
        tl.store(yrow + h * syh + d[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


def block_t(num_tokens: int, interpret: bool) -> int:
    """Token tile: small on GPU for parallelism, larger when interpreted (fewer programs)."""
    cap = 64 if interpret else 16
    return max(1, min(cap, triton.next_power_of_2(max(num_tokens, 1))))


def rerotate_keys(keys, old_pos, new_pos, inv_freq, neox: bool, out, interpret: bool = False):
    """keys, out: [N, T, H, D] with D contiguous (checked by the caller); writes out."""
    n, t, h, d = keys.shape
    if t == 0 or n == 0:
        return
    bt = block_t(t, interpret)
    grid = (triton.cdiv(t, bt), n)
    _rerotate_kernel[grid](
        keys, out, old_pos, new_pos, inv_freq, t, h,
        keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0), out.stride(1), out.stride(2),
        D=d, HALF=inv_freq.numel(), NEOX=neox, BLOCK_T=bt, BLOCK_D=triton.next_power_of_2(d))
