"""The blender's view of a vLLM model (kvplug/blend/adapter.py), over vLLM's own modules.

A decoder layer is run as vLLM runs it (norms, projections, RoPE, MLP: its code, its weights),
except that its attention module is swapped for the blender's for the length of the call, so no
forward context or attention metadata is needed and nothing in vLLM is patched.

    VLLMModelAdapter(model, kv_caches)    or ValueError naming what is not supported
    paged_plan(q_pos, block_table) / paged_attention(i, q, plan)   attention through the engine's
        own kernel over its paged cache (CPU backend); paged_plan is None on other backends, where
        the blender uses torch SDPA over its own copy of the KV
"""
from __future__ import annotations

import torch
from torch import nn

# Families whose decoder layers are (positions, hidden, residual) -> (hidden, residual) and
# whose attention calls self.attn(q, k, v) with rotated q and k. Mistral runs as Llama in vLLM.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ROPES = ("RotaryEmbedding", "Llama3RotaryEmbedding")


class _AttentionHook(nn.Module):
    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    def forward(self, q, k, v, *args, **kwargs):
        return self.attend(q, k, v)


class VLLMModelAdapter:
    def __init__(self, model: nn.Module, kv_caches: dict[str, torch.Tensor]):
        arch = type(model).__name__
        if arch not in SUPPORTED:
            raise ValueError(f"blend supports {', '.join(SUPPORTED)}; this model is {arch} (set blend=false)")
        inner = model.model
        if getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", len(inner.layers)) != len(inner.layers):
            raise ValueError("blend does not support pipeline parallelism")
        self.layers = list(inner.layers)
        self._embed = inner.embed_input_ids if hasattr(inner, "embed_input_ids") else inner.embed_tokens
        first = self.layers[0].self_attn
        self.attn = [layer.self_attn.attn for layer in self.layers]
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        for a in self.attn:
            impl = a.impl
            if getattr(impl, "sliding_window", -1) not in (None, -1) or getattr(impl, "logits_soft_cap", 0) or \
                    getattr(impl, "alibi_slopes", None) is not None:
                raise ValueError(f"blend does not support sliding-window, soft-capped or ALiBi attention ({a.layer_name})")
            if getattr(impl, "kv_cache_dtype", "auto") not in ("auto", str(self.dtype).removeprefix("torch.")):
                raise ValueError(f"blend needs an unquantized KV cache, got kv_cache_dtype={impl.kv_cache_dtype}")
        self.num_layers = len(self.layers)
        self.num_heads, self.num_kv_heads = first.num_heads, first.num_kv_heads
        self.head_dim, self.scale = first.head_dim, float(first.scaling)
        self._caches = [kv_caches[a.layer_name] for a in self.attn]
        self._rope = _rope_of(first.rotary_emb)
        self.paged_plan = self._cpu_plan if _is_cpu_backend(self.attn[0]) else None

    @property
    def rope(self) -> tuple[torch.Tensor, str]:
        return self._rope

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._embed(token_ids)

    def forward_layer(self, i, positions, hidden, residual, attend):
        self_attn = self.layers[i].self_attn
        original = self_attn._modules["attn"]
        self_attn._modules["attn"] = _AttentionHook(attend)
        try:
            return self.layers[i](positions, hidden, residual)
        finally:
            self_attn._modules["attn"] = original

    def write_kv(self, i, k, v, slots):
        a = self.attn[i]
        a.impl.do_kv_cache_update(a, k.contiguous(), v.contiguous(), self._caches[i], slots.to(k.device))

    def paged_attention(self, i, q, plan):
        """q [T, H*D] at the plan's positions, against layer i's paged cache at positions <= each."""
        a = self.attn[i]
        out = torch.empty_like(q)
        a.impl.forward(a, q.view(-1, self.num_heads, self.head_dim), None, None, self._caches[i], plan,
                       out.view(-1, self.num_heads, self.head_dim))
        return out

    def _cpu_plan(self, q_pos, block_table):
        """CPU attention metadata for queries at q_pos (ascending) of one request: one causal
        sequence when they are contiguous, else one single-query sequence per token (a decode
        batch over the same blocks)."""
        from vllm import _custom_ops as ops
        from vllm import envs
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

        a, n = self.attn[0], q_pos.numel()
        bt = block_table.to(torch.int32).view(1, -1)
        if int(q_pos[-1]) - int(q_pos[0]) + 1 == n:
            starts = torch.tensor([0, n], dtype=torch.int32)
            seq_lens = torch.tensor([int(q_pos[-1]) + 1], dtype=torch.int32)
        else:
            starts = torch.arange(n + 1, dtype=torch.int32)
            seq_lens = (q_pos + 1).to(torch.int32)
            bt = bt.expand(n, -1).contiguous()
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.numel(), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype, query_start_loc=starts, causal=True,
            sliding_window_size=-1, isa=a.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=a.impl.kv_cache_dtype)
        return CPUAttentionMetadata(
            num_actual_tokens=n, max_query_len=int((starts[1:] - starts[:-1]).max()), query_start_loc=starts,
            max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=bt,
            slot_mapping=torch.empty(0, dtype=torch.int64), scheduler_metadata=sched, causal=True)


def _is_cpu_backend(attn) -> bool:
    return type(attn.impl).__name__ == "CPUAttentionBackendImpl" and hasattr(attn, "isa")


def _rope_of(rotary_emb) -> tuple[torch.Tensor, str]:
    """inv_freq and style of the model's RoPE. Re-rotation by a position delta is exact only when
    the angle is position x frequency (no position-dependent scaling such as YaRN's)."""
    kind = type(rotary_emb).__name__
    if kind not in _ROPES:
        raise ValueError(f"blend supports RoPE types {', '.join(_ROPES)}; this model uses {kind}")
    if rotary_emb.rotary_dim % 2:
        raise ValueError(f"rotary_dim={rotary_emb.rotary_dim} must be even")
    inv_freq = rotary_emb._compute_inv_freq(rotary_emb.base).float().cpu()
    return inv_freq, "neox" if rotary_emb.is_neox_style else "gptj"
