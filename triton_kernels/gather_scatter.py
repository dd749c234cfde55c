"""Paged KV <-> chunk copies (Triton), all layers in one launch.

The chunk is contiguous [L, 2, T, H, D]; the paged side is 2L views that share one
shape and stride set, reached through an int64 pointer table (entry 2*l+kv is the base
address of layer l's K (kv=0) or V (kv=1) view). Program (i, lkv) moves token tile i
of view lkv. Triton's interpreter dereferences the table too (checked on CPU tensors),
so the same single launch runs under TRITON_INTERPRET=1.

Methods:
    gather(table, slots, out, spec, align, interpret)       out[L,2,T,H,D] <- caches
    scatter(chunk, table, slots, spec, align, interpret)    caches <- chunk (slot -1 skipped)
    rerotate_and_scatter(chunk, old_pos, new_pos, inv_freq, neox, table, slots, spec, align, interpret)
                                                            caches <- chunk, K re-rotated
"""
import triton
import triton.language as tl

from .rope import block_t, rope_tile, rotate


@triton.jit
def _table_entry(table_ptr, lkv, like_ptr, ALIGN16: tl.constexpr):
    """Base pointer of view lkv, typed like like_ptr. A pointer made from an integer has no
    known alignment; ALIGN16 (every base 16-byte aligned, checked by the caller) says so,
    letting the compiler vectorise (Triton already specialises strides divisible by 16)."""
    base = tl.load(table_ptr + lkv).to(tl.pointer_type(like_ptr.dtype.element_ty))
    if ALIGN16:
        base = tl.multiple_of(base, 16)
    return base


@triton.jit
def _slot_rows(slots_ptr, t, tmask, block_size, stride_b, stride_t):
    """Element offset of each token's row in a paged view, and whether the slot is real."""
    slot = tl.load(slots_ptr + t, mask=tmask, other=-1)
    valid = tmask & (slot >= 0)
    slot = tl.where(valid, slot, 0)
    return (slot // block_size) * stride_b + (slot % block_size) * stride_t, valid


@triton.jit
def _gather_kernel(table_ptr, slots_ptr, out_ptr, T, H, block_size, stride_b, stride_t, stride_h,
                   D: tl.constexpr, ALIGN16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    lkv = tl.program_id(1).to(tl.int64)
    base = _table_entry(table_ptr, lkv, out_ptr, ALIGN16)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    src, valid = _slot_rows(slots_ptr, t, tmask, block_size, stride_b, stride_t)
    dst = (lkv * T + t.to(tl.int64)) * H * D
    d = tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, :]
    for h in range(H):
        # Invalid slots (rejected before launch) read as zeros instead of out of bounds.
        x = tl.load(base + src[:, None] + h * stride_h + d[None, :], mask=valid[:, None] & dmask, other=0.0)
        tl.store(out_ptr + dst[:, None] + h * D + d[None, :], x, mask=tmask[:, None] & dmask)


@triton.jit
def _scatter_kernel(chunk_ptr, table_ptr, slots_ptr, old_ptr, new_ptr, inv_freq_ptr,
                    T, H, block_size, stride_b, stride_t, stride_h,
                    D: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr, ROTATE: tl.constexpr,
                    ALIGN16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    lkv = tl.program_id(1).to(tl.int64)
    base = _table_entry(table_ptr, lkv, chunk_ptr, ALIGN16)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    dst, valid = _slot_rows(slots_ptr, t, tmask, block_size, stride_b, stride_t)
    src = (lkv * T + t.to(tl.int64)) * H * D
    d = tl.arange(0, BLOCK_D)
    dmask = (d < D)[None, :]
    if ROTATE:
        delta = tl.load(new_ptr + t, mask=tmask, other=0) - tl.load(old_ptr + t, mask=tmask, other=0)
        c, s, sign, partner, rot = rope_tile(delta, inv_freq_ptr, d, HALF, NEOX)
        # Only K (kv index 0) rotates; V gets an empty rotate mask, so it is copied bit-exact.
        rot = d < (2 * HALF) * (1 - lkv % 2)
    for h in range(H):
        # Padding tokens (slot -1) are neither read nor written.
        m = valid[:, None] & dmask
        x = tl.load(chunk_ptr + src[:, None] + h * D + d[None, :], mask=m, other=0.0)
        if ROTATE:
            xp = tl.load(chunk_ptr + src[:, None] + h * D + partner[None, :], mask=m & rot[None, :], other=0.0)
            x = rotate(x, xp, c, s, sign, rot[None, :]).to(chunk_ptr.dtype.element_ty)
        tl.store(base + dst[:, None] + h * stride_h + d[None, :], x, mask=m)


def _grid(spec, num_tokens, interpret):
    bt = block_t(num_tokens, interpret)
    return bt, (triton.cdiv(num_tokens, bt), 2 * spec.num_layers)


def gather(table, slots, out, spec, align=1, interpret=False):
    """align: byte alignment shared by all base addresses (kv_layout.base_alignment)."""
    t = slots.numel()
    if t == 0:
        return
    bt, grid = _grid(spec, t, interpret)
    _gather_kernel[grid](table, slots, out, t, spec.num_heads, spec.block_size,
                         spec.stride_block, spec.stride_token, spec.stride_head,
                         D=spec.head_dim, ALIGN16=align % 16 == 0, BLOCK_T=bt,
                         BLOCK_D=triton.next_power_of_2(spec.head_dim))


def _scatter(chunk, table, slots, spec, align, interpret, rope):
    t = slots.numel()
    if t == 0:
        return
    bt, grid = _grid(spec, t, interpret)
    old_pos, new_pos, inv_freq, neox = rope if rope is not None else (slots, slots, chunk, True)
    _scatter_kernel[grid](chunk, table, slots, old_pos, new_pos, inv_freq,
                          t, spec.num_heads, spec.block_size, spec.stride_block, spec.stride_token, spec.stride_head,
                          D=spec.head_dim, HALF=inv_freq.numel() if rope is not None else 1, NEOX=neox,
                          ROTATE=rope is not None, ALIGN16=align % 16 == 0, BLOCK_T=bt,
                          BLOCK_D=triton.next_power_of_2(spec.head_dim))


def scatter(chunk, table, slots, spec, align=1, interpret=False):
    _scatter(chunk, table, slots, spec, align, interpret, None)


def rerotate_and_scatter(chunk, old_pos, new_pos, inv_freq, neox, table, slots, spec, align=1, interpret=False):
    _scatter(chunk, table, slots, spec, align, interpret, (old_pos, new_pos, inv_freq, neox))
