"""LMCache's c_ops beside kvplug's gather/scatter, when `lmcache` imports here (its wheel is
not carried to the GPU machine by default; where it is absent, or its signature is not the one
below, the benchmark says so in a note and compares with torch and the copy ceiling only).

LMCache's multi_layer_kv_transfer, as its vLLM connector (v1 gpu_connector, legacy signature)
calls it: key_value [2, L, T, H*D] (its KV_2LTD format), key_value_ptrs int64 [L] of per-layer
[2, num_slots, H*D] caches, slot_mapping, device, page_buffer_size, direction (True: paged ->
key_value), use_mla. It gets its own copy of the caches in that layout, filled with the same
values, and its first result is compared with the reference before it is timed: an LMCache
figure is never reported from a call whose output was not the right KV.

Methods:
    peer(caches, slots, chunk) -> ({"gather": {"lmcache": fn}, "scatter": {...}}, notes)
"""
from __future__ import annotations

import torch


def _c_ops():
    try:
        from lmcache import c_ops  # noqa: PLC0415 - optional peer
    except Exception as exc:  # noqa: BLE001 - any import failure means: no peer here
        return None, f"lmcache: not importable here ({type(exc).__name__})"
    return c_ops, None


def peer(caches, slots: torch.Tensor, chunk: torch.Tensor):
    ops, note = _c_ops()
    if ops is None:
        return {}, [note]
    if slots.device.type != "cuda":
        return {}, ["lmcache: CUDA tensors only"]
    L, _, T, H, D = chunk.shape
    legacy = [torch.stack([k, v]).reshape(2, -1, H * D) for k, v in caches]  # [2, nb*bs, H*D], same values
    ptrs = torch.tensor([t.data_ptr() for t in legacy], dtype=torch.int64, device=slots.device)
    pages = legacy[0].shape[1]
    buf = torch.empty(2, L, T, H * D, dtype=chunk.dtype, device=chunk.device)
    src = chunk.transpose(0, 1).reshape(2, L, T, H * D).contiguous()

    def gather():
        ops.multi_layer_kv_transfer(buf, ptrs, slots, slots.device, pages, True, False)
        return buf.view(2, L, T, H, D).transpose(0, 1)

    def scatter():
        ops.multi_layer_kv_transfer(src, ptrs, slots, slots.device, pages, False, False)
        return [t[0].view(*caches[0][0].shape) for t in legacy]
    try:
        got = gather().clone()
        want = torch.stack([torch.stack([k[slots // k.shape[1], slots % k.shape[1]],
                                         v[slots // v.shape[1], slots % v.shape[1]]]) for k, v in caches])
        if not torch.equal(got, want):
            return {}, ["lmcache: multi_layer_kv_transfer ran but gathered other values (layout or signature "
                        "differs from the legacy one): not timed"]
    except Exception as exc:  # noqa: BLE001 - another LMCache version: say so, time the rest
        return {}, [f"lmcache: multi_layer_kv_transfer did not take the legacy signature "
                    f"({type(exc).__name__}: {str(exc)[:120]}): not timed"]
    version = getattr(__import__("lmcache"), "__version__", "?")
    return {"gather": {"lmcache": gather}, "scatter": {"lmcache": scatter}}, [f"lmcache {version}: timed beside"]
