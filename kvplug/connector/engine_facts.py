"""What kvplug needs to know about the engine, read once from vLLM's config objects.

Both halves compute these the same way, so the scheduler's slot numbers and the worker's
host pool agree without talking to each other.

    EngineFacts.from_vllm(vllm_config, kv_cache_config, cfg)   validated facts, or ValueError
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import vllm
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import AttentionSpec

from kvplug.blend.chunk_format import chunk_nbytes
from kvplug.config import KVPlugConfig
from kvplug.core.hashing import namespace_digest

logger = logging.getLogger("kvplug")


@dataclass(frozen=True)
class EngineFacts:
    namespace: bytes  # digest of everything that changes KV bytes, the root of every key
    block_size: int
    unit_bytes: int  # one block across all layers of this rank, as the spec sizes it
    layer_names: tuple[str, ...]
    num_blocks: int
    tp_size: int
    kv_heads: int = 0
    head_dim: int = 0
    itemsize: int = 2
    cluster_tokens: int = 0  # tokens per key cluster stored with each chunk (kept_cluster_tokens; 0: none)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def chunk_bytes(self, tokens: int) -> int:
        """A stored chunk's payload: its KV, then its key clusters when kept (the count the worker's
        ChunkFormat makes: kvplug/blend/chunk_format.py)."""
        return chunk_nbytes(self.num_layers, self.kv_heads, self.head_dim, self.itemsize, self.cluster_tokens, tokens)

    @classmethod
    def from_vllm(cls, vllm_config, kv_cache_config, cfg: KVPlugConfig) -> "EngineFacts":
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
            kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
            raise ValueError(
                f"KVPlugConnector supports models whose layers share one attention KV cache group; "
                f"this model has {len(groups)} group(s) of {kinds}"
            )
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ValueError("KVPlugConnector does not support pipeline parallelism yet (pipeline_parallel_size > 1)")
        if getattr(parallel, "nnodes", 1) > 1 and cfg.tiers.disk_path:
            # Each rank writes its own file of a unit and a unit is a hit only when every rank's file is
            # there: ranks on other nodes must see the same folder.
            logger.warning("kvplug: the engine spans %d nodes: disk_path=%s must be one shared file system mounted "
                           "at the same path on every node, or no unit will ever be found on disk",
                           parallel.nnodes, cfg.tiers.disk_path)
        spec = groups[0].kv_cache_spec
        layer_names = tuple(groups[0].layer_names)
        model = vllm_config.model_config
        namespace = namespace_digest(
            model=cfg.model_id or model.model,
            revision=model.revision,
            dtype=str(model.dtype),
            kv_cache_dtype=vllm_config.cache_config.cache_dtype,
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            num_layers=len(layer_names),
            tp_size=parallel.tensor_parallel_size,
            device=current_platform.device_type,
            vllm=vllm.__version__,
        )
        return cls(
            namespace=namespace,
            block_size=spec.block_size,
            unit_bytes=spec.page_size_bytes * len(layer_names),
            layer_names=layer_names,
            num_blocks=kv_cache_config.num_blocks,
            tp_size=parallel.tensor_parallel_size,
            kv_heads=spec.num_kv_heads, head_dim=spec.head_size, itemsize=spec.dtype.itemsize,
            cluster_tokens=kept_cluster_tokens(cfg, model.max_model_len),
        )


def kept_cluster_tokens(cfg: KVPlugConfig, max_model_len: int) -> int:
    """Tokens per key cluster stored with each chunk, or 0: clusters serve only spans of at least
    blend_cluster_min_tokens, so an engine whose prompts cannot be that long keeps none (making
    them is most of a chunk save's cost on CPU)."""
    b = cfg.blend
    if not b.enabled or not b.blend_cluster_min_tokens or max_model_len < b.blend_cluster_min_tokens:
        return 0
    return b.blend_cluster_tokens
