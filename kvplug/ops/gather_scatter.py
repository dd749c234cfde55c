"""Chunk KV <-> vLLM paged KV cache, all layers in one kernel launch.

The chunk is our canonical contiguous layout [L, 2, T, H, D] (index 0 = K, 1 = V);
kv_caches is a list of L (k_view, v_view) pairs, each [num_blocks, block_size, H, D]
with head_dim contiguous and one shared stride set (see kv_layout). slots[t] is the
vLLM slot of token t. Non-negative slots must be distinct on scatter.

Methods:
    gather_chunks_ref(kv_caches, slots)              the torch spec of gather_chunks
    scatter_chunks_ref(chunk, kv_caches, slots)      the torch spec of scatter_chunks
    rerotate_and_scatter_ref(chunk, old_pos, new_pos, inv_freq, style, kv_caches, slots)
    gather_chunks(kv_caches, slots, out=None, backend="auto") -> [L, 2, T, H, D]
    scatter_chunks(chunk, kv_caches, slots, backend="auto")    in place into the caches
    rerotate_and_scatter(chunk, old_pos, new_pos, inv_freq, style, kv_caches, slots, backend="auto")
"""
from __future__ import annotations

import torch

from kvplug import envs
from kvplug.ops import _backend
from kvplug.ops.kv_layout import PagedSpec, base_alignment, check_slots, paged_spec, pointer_table
from kvplug.ops.rope import check_rope_args, rerotate_keys_ref


def _unzip(kv_caches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [k for k, _ in kv_caches], [v for _, v in kv_caches]


def gather_chunks_ref(kv_caches, slots: torch.Tensor) -> torch.Tensor:
    """out[l, 0, t] = K_l[slots[t] // bs, slots[t] % bs], out[l, 1, t] likewise from V_l.

    Shapes: K_l, V_l [nb, bs, H, D]; slots int64 [T], each in [0, nb * bs) (-1 is an
    error here). Returns a new contiguous [L, 2, T, H, D] tensor in the caches' dtype."""
    bs = kv_caches[0][0].shape[1]
    blk, off = slots // bs, slots % bs
    return torch.stack([torch.stack([k[blk, off], v[blk, off]]) for k, v in kv_caches]).contiguous()


def scatter_chunks_ref(chunk: torch.Tensor, kv_caches, slots: torch.Tensor) -> None:
    """Inverse of gather: K_l[s // bs, s % bs] = chunk[l, 0, t] (V likewise) for every t
    with s = slots[t] >= 0; slot -1 (padding) is skipped. chunk dtype = cache dtype."""
    keep = slots >= 0
    bs = kv_caches[0][0].shape[1]
    blk, off = slots[keep] // bs, slots[keep] % bs
    for layer, (k, v) in enumerate(kv_caches):
        k[blk, off] = chunk[layer, 0, keep]
        v[blk, off] = chunk[layer, 1, keep]


def rerotate_and_scatter_ref(chunk, old_pos, new_pos, inv_freq, style, kv_caches, slots) -> None:
    """scatter_chunks_ref of chunk with K replaced by rerotate_keys_ref(K, old_pos, new_pos,
    inv_freq, style); V is copied unchanged. Does not modify chunk."""
    moved = chunk.clone()
    moved[:, 0] = rerotate_keys_ref(chunk[:, 0], old_pos, new_pos, inv_freq, style)
    scatter_chunks_ref(moved, kv_caches, slots)


def _check_chunk(chunk: torch.Tensor, spec: PagedSpec, num_tokens: int, name: str) -> None:
    want = (spec.num_layers, 2, num_tokens, spec.num_heads, spec.head_dim)
    if tuple(chunk.shape) != want or chunk.dtype != spec.dtype or chunk.device != spec.device:
        raise ValueError(f"{name} of shape {tuple(chunk.shape)} {chunk.dtype} on {chunk.device}: "
                         f"expected {want} {spec.dtype} on {spec.device}")
    if not chunk.is_contiguous():
        raise ValueError(f"{name} of shape {tuple(chunk.shape)} strides {chunk.stride()}: must be contiguous")


def _check_slots_meta(slots: torch.Tensor, spec: PagedSpec) -> None:
    """Shape/dtype/device only; slot values are checked inside the ops (data dependent)."""
    if slots.dim() != 1 or slots.dtype != torch.int64 or slots.device != spec.device:
        raise ValueError(f"slots of shape {tuple(slots.shape)} {slots.dtype} on {slots.device}: "
                         f"expected int64 [T] on {spec.device}")


def _paged_args(spec: PagedSpec) -> tuple[int, int, int, int]:
    return spec.block_size, spec.stride_block, spec.stride_token, spec.stride_head


def _copy_args(spec: PagedSpec, k_caches, v_caches) -> tuple[int, ...]:
    """The CUDA copies also take the base-address alignment to pick their vector width."""
    return (*_paged_args(spec), base_alignment(k_caches, v_caches))


@torch.library.custom_op("kvplug::gather_chunks", mutates_args=("out",))
def _gather_op(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], slots: torch.Tensor,
               out: torch.Tensor, backend: str) -> None:
    check_slots(slots, paged_spec(k_caches, v_caches).num_slots, allow_skip=False)
    which = _backend.choose("gather_chunks", slots.device, backend)
    if which == "torch":
        out.copy_(gather_chunks_ref(list(zip(k_caches, v_caches)), slots))
        return
    spec = paged_spec(k_caches, v_caches)
    table = pointer_table(k_caches, v_caches)
    if which == "cuda":
        _backend.cuda_ops().gather_chunks(table, slots, out, *_copy_args(spec, k_caches, v_caches))
    else:
        from kvplug._triton import gather_scatter as tk
        tk.gather(table, slots, out, spec, base_alignment(k_caches, v_caches),
                  interpret=envs.triton_interpret())


@_gather_op.register_fake
def _(k_caches, v_caches, slots, out, backend):
    return None


def gather_chunks(kv_caches, slots: torch.Tensor, out: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Dispatcher for gather_chunks_ref (see there); out, if given, is filled and returned."""
    k_caches, v_caches = _unzip(kv_caches)
    spec = paged_spec(k_caches, v_caches)
    _check_slots_meta(slots, spec)
    slots = slots.contiguous()  # the kernels index slots[t] densely
    if out is None:
        out = torch.empty(spec.num_layers, 2, slots.numel(), spec.num_heads, spec.head_dim,
                          dtype=spec.dtype, device=spec.device)
    _check_chunk(out, spec, slots.numel(), "out")
    if slots.numel() > 0:
        _gather_op(k_caches, v_caches, slots, out, backend)
    return out


@torch.library.custom_op("kvplug::scatter_chunks", mutates_args=("k_caches", "v_caches"))
def _scatter_op(chunk: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                slots: torch.Tensor, backend: str) -> None:
    check_slots(slots, paged_spec(k_caches, v_caches).num_slots, allow_skip=True)
    which = _backend.choose("scatter_chunks", chunk.device, backend)
    if which == "torch":
        scatter_chunks_ref(chunk, list(zip(k_caches, v_caches)), slots)
        return
    spec = paged_spec(k_caches, v_caches)
    table = pointer_table(k_caches, v_caches)
    if which == "cuda":
        _backend.cuda_ops().scatter_chunks(chunk, table, slots, *_copy_args(spec, k_caches, v_caches))
    else:
        from kvplug._triton import gather_scatter as tk
        tk.scatter(chunk, table, slots, spec, base_alignment(k_caches, v_caches),
                   interpret=envs.triton_interpret())


@_scatter_op.register_fake
def _(chunk, k_caches, v_caches, slots, backend):
    return None


def _check_scatter(chunk, kv_caches, slots) -> tuple[list, list]:
    k_caches, v_caches = _unzip(kv_caches)
    spec = paged_spec(k_caches, v_caches)
    _check_slots_meta(slots, spec)
    _check_chunk(chunk, spec, slots.numel(), "chunk")
    return k_caches, v_caches


def scatter_chunks(chunk: torch.Tensor, kv_caches, slots: torch.Tensor, backend: str = "auto") -> None:
    """Dispatcher for scatter_chunks_ref (see there): writes the caches in place."""
    k_caches, v_caches = _check_scatter(chunk, kv_caches, slots)
    if slots.numel() > 0:
        _scatter_op(chunk, k_caches, v_caches, slots.contiguous(), backend)


@torch.library.custom_op("kvplug::rerotate_and_scatter", mutates_args=("k_caches", "v_caches"))
def _rerotate_scatter_op(chunk: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq: torch.Tensor,
                         style: str, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                         slots: torch.Tensor, backend: str) -> None:
    check_slots(slots, paged_spec(k_caches, v_caches).num_slots, allow_skip=True)
    which = _backend.choose("rerotate_and_scatter", chunk.device, backend)
    if which == "torch":
        rerotate_and_scatter_ref(chunk, old_pos, new_pos, inv_freq, style, list(zip(k_caches, v_caches)), slots)
        return
    spec = paged_spec(k_caches, v_caches)
    table = pointer_table(k_caches, v_caches)
    neox = style == "neox"
    if which == "cuda":
        _backend.cuda_ops().rerotate_and_scatter(chunk, old_pos, new_pos, inv_freq, neox, table, slots,
                                                 *_paged_args(spec))
    else:
        from kvplug._triton import gather_scatter as tk
        tk.rerotate_and_scatter(chunk, old_pos, new_pos, inv_freq, neox, table, slots, spec,
                                base_alignment(k_caches, v_caches), interpret=envs.triton_interpret())


@_rerotate_scatter_op.register_fake
def _(chunk, old_pos, new_pos, inv_freq, style, k_caches, v_caches, slots, backend):
    return None


def rerotate_and_scatter(chunk: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq: torch.Tensor,
                         style: str, kv_caches, slots: torch.Tensor, backend: str = "auto") -> None:
    """Dispatcher for rerotate_and_scatter_ref (see there): K re-rotated, V copied, in place."""
    k_caches, v_caches = _check_scatter(chunk, kv_caches, slots)
    check_rope_args(chunk[:, 0], old_pos, new_pos, inv_freq, style)
    if slots.numel() > 0:
        _rerotate_scatter_op(chunk, old_pos.contiguous(), new_pos.contiguous(), inv_freq.contiguous(), style,
                             k_caches, v_caches, slots.contiguous(), backend)
