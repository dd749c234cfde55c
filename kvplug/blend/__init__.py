"""kvplug.blend: blending of cached chunk KV into new prompts at any position (CacheBlend and its
successors).

Worker-side, over torch, never vLLM (the connector adapts vLLM's model to it): blender.Blender runs
one blend over a model adapter (adapter.ModelAdapter; hf_adapter for transformers models);
policies.POLICIES names the recompute policies and selection.py holds their parts. Chunk KV is
stored by the tiers (kvplug/tiers), like prefix blocks.
"""
