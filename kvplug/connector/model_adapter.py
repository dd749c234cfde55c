"""The blender's view of a vLLM model (kvplug/blend/adapter.py), over vLLM's own modules.

A decoder layer is run as vLLM runs it (norms, q/k norms, projections, RoPE, MLP: its code, its
weights), except that its attention module is swapped for the blender's for the length of the
call, so no forward context or attention metadata is needed and nothing in vLLM is patched. What
differs between families - where the parts are, each layer's RoPE module and sliding window, what
is refused - and every vLLM internal it relies on are in vllm_compat.

    VLLMModelAdapter(model, kv_caches, block_size, kv_io="opaque")   or ValueError naming what is
        not supported: a family of vllm_compat.TESTED_FAMILIES, or any other whose layers pass
        vllm_compat.check_layers against vLLM's own forward (on the CPU backend, where the engine's
        kernel is reachable); every other architecture is refused, named, at start-up.
        kv_io is the worker's KV path (kvplug/tiers/block_io.py):
        "opaque": write_kv through the backend's do_kv_cache_update, read_kv / read_kv_layers through
            the probed PagedKVReader (the CPU backend: its block interior may be ISA-packed)
        "canonical": vLLM's CUDA layouts through PagedKV (kvplug/blend/paged_cache.py), with the
            optional write_kv_layers / write_rerotated / read_kv_layers (one launch each)
    paged_plan([(q_pos, block_table)]) / paged_attention(i, q, plan)   attention through the engine's
        own kernel over its paged cache (CPU backend), a sequence per run of positions of each
        request; paged_plan is None on other backends, where the blender uses torch SDPA over its
        own copy of the KV
    rope / rope_for(i) / window(i)   layer 0's and layer i's (inv_freq, style), layer i's sliding window
    write_kv(i, k, v, slots) / read_kv(i, slots) -> (k, v)   per-token K/V of layer i in and out
    logits(hidden, residual)        the model's final norm and LM head (the blend audit)
    all_reduce(t)                   t summed over the tensor-parallel ranks (agreed token picks)
    backend_write(i, k, v, slots)   the backend's own write op, whatever kv_io (for the self-test)
    cache(i)                        layer i's paged cache tensor
"""
from __future__ import annotations

import torch
from torch import nn

from kvplug.blend.paged_cache import PagedCacheKV
from kvplug.connector import vllm_compat as compat


class _AttentionHook(nn.Module):
    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    def forward(self, q, k, v, *args, **kwargs):
        return self.attend(q, k, v)


class VLLMModelAdapter:
    def __init__(self, model: nn.Module, kv_caches: dict[str, torch.Tensor], block_size: int, kv_io: str = "opaque"):
        self._model = model
        stack = compat.decoder_stack(model)
        self.arch, self.layers, self._embed = stack.arch, stack.layers, stack.embed
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        facts = [compat.layer_attention(self.arch, i, layer, self.dtype) for i, layer in enumerate(self.layers)]
        self.attn = [f.attn for f in facts]
        self._ropes = [compat.rope_frequencies(f.rotary) for f in facts]
        self._windows = [f.window for f in facts]
        first = facts[0]
        self.num_layers = len(self.layers)
        self.num_heads, self.num_kv_heads = first.num_heads, first.num_kv_heads
        self.head_dim, self.scale = first.head_dim, first.scale
        self.block_size = block_size
        self._caches = [kv_caches[f.cache_name] for f in facts]
        kernel_block = compat.kernel_block_size(self._caches[0])
        if kernel_block != block_size:
            raise ValueError(f"blend needs the cache's kernel block size ({kernel_block}) to equal vLLM's block "
                             f"size ({block_size})")
        if any(f.scale != self.scale for f in facts):
            raise ValueError(f"blend needs one attention scale for every layer of {self.arch}")
        self._rope = self._ropes[0]
        cpu = compat.is_cpu_backend(self.attn[0])
        self._kv_path(kv_io, cpu)
        self.paged_plan = self._cpu_plan if cpu else None
        shared = set(self._windows)  # the CPU plan's window: one all layers share, else -1
        self._plan_window = (shared.pop() or -1) if len(shared) == 1 else -1
        if self.arch not in compat.TESTED_FAMILIES:  # also a tested name served by a generic vLLM class
            self._prove()

    def _prove(self) -> None:
        """A family no test covers is blended only where its layers are shown, at start-up, to
        run through the adapter as vLLM's own forward runs them."""
        if self.paged_plan is None:
            why = "its layers can be checked against vLLM's own forward on the CPU backend only"
        else:
            why = compat.check_layers(self, own_forward=True)
        if why is not None:
            raise ValueError(f"blend does not support {self.arch}: it is not among the tested families "
                             f"({', '.join(compat.TESTED_FAMILIES)}) and {why} (set blend=false)")

    def _kv_path(self, kv_io: str, cpu: bool) -> None:
        """canonical: PagedKV over the caches, the all-layer methods bound; opaque: the backend's
        write op and a reader learned by probing it."""
        self.kv_io, self._paged, self._reader = kv_io, None, None
        if kv_io == "canonical":
            if cpu:
                raise ValueError("kv_io='canonical' on vLLM's CPU backend: its blocks may be ISA-packed (use 'opaque')")
            self._paged = PagedCacheKV(self._caches, self._rope)  # its fused re-rotation: one-RoPE models only
            self._paged.bind(self)
        elif kv_io == "opaque":
            self._reader = compat.PagedKVReader(self.attn[0], self._caches[0], self.num_kv_heads, self.head_dim,
                                                self.block_size)
            self.read_kv_layers = self._read_layers
        else:
            raise ValueError(f"kv_io={kv_io!r}: allowed values are opaque, canonical")

    @property
    def rope(self) -> tuple[torch.Tensor, str]:
        return self._rope

    def rope_for(self, i: int) -> tuple[torch.Tensor, str]:
        return self._ropes[i]

    def window(self, i: int) -> int | None:
        return self._windows[i]

    def cache(self, i: int) -> torch.Tensor:
        return self._caches[i]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._embed(token_ids)

    def forward_layer(self, i, positions, hidden, residual, attend):
        with compat.attention_replaced(self.layers[i], _AttentionHook(attend)):
            return self.layers[i](positions, hidden, residual)

    def write_kv(self, i, k, v, slots):
        if self._paged is not None:
            self._paged.write_kv(i, k, v, slots)
        else:
            self.backend_write(i, k, v, slots)

    def backend_write(self, i, k, v, slots):
        compat.kv_write(self.attn[i], k, v, self._caches[i], slots)

    def read_kv(self, i, slots):
        if self._paged is not None:
            return self._paged.read_kv(i, slots)
        return self._reader.read(self._caches[i], slots)

    def _read_layers(self, slots, first_layer=0, num_layers=None):
        last = self.num_layers if num_layers is None else first_layer + num_layers
        return self._reader.read_layers(self._caches[first_layer:last], slots)

    def all_reduce(self, t):
        return compat.tp_all_reduce(t, self.device)

    def logits(self, hidden, residual):
        return compat.final_logits(self._model, hidden, residual)

    def paged_attention(self, i, q, plan):
        """q [T, H*D] at the plan's positions, against layer i's paged cache at positions <= each."""
        out = compat.cpu_paged_attention(self.attn[i], q.view(-1, self.num_heads, self.head_dim), self._caches[i], plan)
        return out.view(q.shape)

    def _cpu_plan(self, segments):
        return compat.cpu_paged_metadata(self.attn[0], segments, self.num_heads, self.num_kv_heads, self.head_dim,
                                         self.dtype, self._plan_window)
