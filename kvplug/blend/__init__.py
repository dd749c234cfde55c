"""kvplug.blend: blending of cached chunk KV into new prompts at any position (CacheBlend).

Worker-side, over torch and kvplug.tiers, never vLLM (the connector adapts vLLM's model to it).
store.ChunkStore keeps chunk KV in the canonical [layers, 2, tokens, kv_heads, head_dim] layout,
in a CPU LRU over an optional disk tier.
"""
