"""The blender's view of a Hugging Face transformers model (Llama, Mistral, Qwen2, Qwen3, Gemma 3).

It runs each decoder layer as transformers runs it - the model's own layer forward (norms, q/k
norms, projections, RoPE, MLP, Gemma's four norms), its own rotary embedding (per layer type for
Gemma 3) - with only the attention function swapped for the blender's, through transformers'
AttentionInterface, the way kvplug/connector/model_adapter.py does over vLLM's modules. Used
offline: to measure blending policies in float32 without an engine (benchmarks/) and to test the
blender against transformers' own forward. KV writes go to `self.kv` [layers, 2, positions,
kv_heads, head_dim], indexed by slot = position.

    HFModelAdapter(model, max_positions)    or ValueError naming what is not supported
    rope_for(i) / window(i)                 layer i's RoPE and sliding window (adapter.py)
    cache_for(end) -> DynamicCache          positions [0, end) of the written KV, for model(...)
"""
from __future__ import annotations

import torch

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")
# RoPE types whose angle is position x a fixed frequency: keys re-rotate exactly by a delta.
ROPE_TYPES = ("default", "linear", "llama3")
_ATTN = "kvplug_blend"  # the attention implementation name registered with transformers


def _blend_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention call, answered by the blender: q [1, H, T, D], k/v [1, KV, T, D]
    (rotated) -> ([1, T, H, D], None). The mask is the blender's to make."""
    _, H, T, D = query.shape
    out = module._kvplug_attend(query[0].transpose(0, 1).reshape(T, H * D),
                                key[0].transpose(0, 1).reshape(T, -1), value[0].transpose(0, 1).reshape(T, -1))
    return out.view(1, T, H, D), None


class HFModelAdapter:
    paged_plan = None  # the blender attends with torch SDPA over its own copy of the KV

    def __init__(self, model, max_positions: int):
        arch = type(model).__name__
        if arch not in SUPPORTED:
            raise ValueError(f"HFModelAdapter supports {', '.join(SUPPORTED)}; got {arch}")
        from transformers import AttentionInterface

        AttentionInterface.register(_ATTN, _blend_attention)
        cfg = model.config
        self.model, self.arch = model, arch
        self.layers = list(model.model.layers)
        attn = [layer.self_attn for layer in self.layers]
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn[0].head_dim
        self.scale = float(attn[0].scaling)
        if any(float(a.scaling) != self.scale for a in attn):
            raise ValueError(f"{arch}: layers with different attention scales")
        if getattr(cfg, "attn_logit_softcapping", None):
            raise ValueError(f"{arch}: soft-capped attention logits (attn_logit_softcapping) are not supported")
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        self._rotary = model.model.rotary_emb
        self._types = list(getattr(cfg, "layer_types", None) or []) if arch == "Gemma3ForCausalLM" else []
        self._ropes = [self._layer_rope(i) for i in range(self.num_layers)]
        self._windows = [self._layer_window(a, cfg) for a in attn]
        self.kv = torch.zeros((self.num_layers, 2, max_positions, self.num_kv_heads, self.head_dim),
                              dtype=self.dtype, device=self.device)

    def _layer_rope(self, i: int) -> tuple[torch.Tensor, str]:
        """Layer i's (inv_freq, "neox"): Gemma 3 keeps one set per layer type."""
        r, kind = self._rotary, self._types[i] if self._types else None
        rope_type = r.rope_type[kind] if kind else r.rope_type
        scaling = getattr(r, f"{kind}_attention_scaling") if kind else r.attention_scaling
        if rope_type not in ROPE_TYPES or scaling != 1.0:
            raise ValueError(f"{self.arch}: RoPE type {rope_type!r} (attention scaling {scaling}) cannot be re-rotated; "
                             f"supported: {', '.join(ROPE_TYPES)}")
        inv_freq = getattr(r, f"{kind}_inv_freq") if kind else r.inv_freq
        return inv_freq.float().cpu(), "neox"

    def _layer_window(self, attn, cfg) -> int | None:
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window or None
        return getattr(cfg, "sliding_window", None) if self.arch == "MistralForCausalLM" else None

    @property
    def rope(self) -> tuple[torch.Tensor, str]:
        return self._ropes[0]

    def rope_for(self, i: int) -> tuple[torch.Tensor, str]:
        return self._ropes[i]

    def window(self, i: int) -> int | None:
        return self._windows[i]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(token_ids)  # Gemma 3's scales by sqrt(hidden) itself

    def forward_layer(self, i, positions, hidden, residual, attend):
        x = hidden if residual is None else hidden + residual
        layer = self.layers[i]
        pos = positions.view(1, -1)
        rope = self._rotary(x[None], pos, self._types[i]) if self._types else self._rotary(x[None], pos)
        cfg, attn = self.model.config, layer.self_attn
        before = cfg._attn_implementation
        cfg._attn_implementation, attn._kvplug_attend = _ATTN, attend
        try:
            out = layer(x[None], attention_mask=None, position_ids=pos, position_embeddings=rope)
        finally:
            cfg._attn_implementation = before
            del attn._kvplug_attend
        out = out[0] if isinstance(out, tuple) else out
        return out[0], torch.zeros_like(x)  # the layer adds its residual itself

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
