"""The blender's view of a Hugging Face transformers model (Llama, Mistral, Qwen2 families).

It runs a decoder layer from the model's own modules (norms, projections, RoPE, MLP) with the
blender's attention in the middle, the way kvplug/connector/model_adapter.py does over vLLM's
modules. Used offline: to measure blending policies in float32 without an engine
(benchmarks/blend_offline.py) and to test the blender against transformers' own forward.
KV writes go to `self.kv` [layers, 2, positions, kv_heads, head_dim], indexed by slot = position.

    HFModelAdapter(model, max_positions)    or ValueError naming what is not supported
    cache_for(end) -> DynamicCache          positions [0, end) of the written KV, for model(...)
"""
from __future__ import annotations

import torch

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class HFModelAdapter:
    paged_plan = None  # the blender attends with torch SDPA over its own copy of the KV

    def __init__(self, model, max_positions: int):
        arch = type(model).__name__
        if arch not in SUPPORTED:
            raise ValueError(f"HFModelAdapter supports {', '.join(SUPPORTED)}; got {arch}")
        cfg = model.config
        rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default"}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"HFModelAdapter supports default RoPE only, got {rope}")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and arch != "Qwen2ForCausalLM":
            raise ValueError("HFModelAdapter does not support sliding-window attention")
        self.model = model
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scale = float(attn.scaling)
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        self._rotary = model.model.rotary_emb
        self._rope = (self._rotary.inv_freq.float().cpu(), "neox")
        self.kv = torch.zeros((self.num_layers, 2, max_positions, self.num_kv_heads, self.head_dim),
                              dtype=self.dtype, device=self.device)

    @property
    def rope(self) -> tuple[torch.Tensor, str]:
        return self._rope

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(token_ids)

    def forward_layer(self, i, positions, hidden, residual, attend):
        layer, n = self.layers[i], positions.numel()
        x = hidden if residual is None else hidden + residual
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(n, self.num_heads, self.head_dim)
        k = a.k_proj(h).view(n, self.num_kv_heads, self.head_dim)
        v = a.v_proj(h).view(n, self.num_kv_heads * self.head_dim)
        cos, sin = self._rotary(h, positions.view(1, -1))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [n, 1, D]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        out = attend(q.reshape(n, -1), k.reshape(n, -1), v)
        x = x + a.o_proj(out)
        return layer.mlp(layer.post_attention_layernorm(x)), x

    def write_kv(self, i, k, v, slots):
        self.kv[i, 0, slots.to(self.device)] = k.to(self.dtype)
        self.kv[i, 1, slots.to(self.device)] = v.to(self.dtype)

    def read_kv(self, i, slots):
        slots = slots.to(self.device)
        return self.kv[i, 0, slots], self.kv[i, 1, slots]

    def logits(self, hidden, residual):
        x = hidden if residual is None else hidden + residual
        return self.model.lm_head(self.model.model.norm(x))

    def paged_attention(self, i, q, plan):  # pragma: no cover - paged_plan is None
        raise NotImplementedError

    def cache_for(self, end: int):
        """transformers' DynamicCache holding the written KV of positions [0, end)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            k = self.kv[i, 0, :end].transpose(0, 1).unsqueeze(0).contiguous()  # [1, KV, T, D]
            v = self.kv[i, 1, :end].transpose(0, 1).unsqueeze(0).contiguous()
            cache.update(k, v, i)
        return cache


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
