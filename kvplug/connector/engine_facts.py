"""What kvplug needs to know about the engine, read once from vLLM's config objects.

Both halves compute these the same way, so the scheduler's slot numbers and the worker's
host pool agree without talking to each other.

    EngineFacts.from_vllm(vllm_config, kv_cache_config, cfg)   validated facts, or ValueError
    facts.chunk_bytes(tokens)              a stored chunk's payload bytes
    facts.stored_bytes(nbytes, codec)      a unit's payload bytes as a tier stores it under a KV codec
"""
from __future__ import annotations

from dataclasses import dataclass

import vllm
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import AttentionSpec

from kvplug.config import KVPlugConfig
from kvplug.core.hashing import namespace_digest


@dataclass(frozen=True)
class EngineFacts:
    namespace: bytes  # digest of everything that changes KV bytes, the root of every key
    block_size: int
    unit_bytes: int  # one block across all layers of this rank, as the spec sizes it
    layer_names: tuple[str, ...]
    num_blocks: int
    tp_size: int
    chunk_token_bytes: int = 0  # one token's K and V of every layer in the canonical chunk layout (this rank)
    kv_heads: int = 0
    head_dim: int = 0
    itemsize: int = 2
    cluster_tokens: int = 0  # tokens per key cluster stored with each chunk (blend_cluster_tokens; 0: none)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def chunk_bytes(self, tokens: int) -> int:
        """A stored chunk's payload: its KV, then its key clusters (kvplug/blend/clusters.py), the
        same count the worker's blender makes (Blender.chunk_bytes)."""
        if not self.cluster_tokens:
            return tokens * self.chunk_token_bytes
        from kvplug.blend.clusters import sidecar_bytes

        return tokens * self.chunk_token_bytes + sidecar_bytes(self.num_layers, self.kv_heads, self.head_dim, tokens,
                                                               self.cluster_tokens, self.itemsize)

    def stored_bytes(self, nbytes: int, codec: str) -> int:
        """Payload bytes of a unit of `nbytes` as a tier stores it under `codec` (kvplug/tiers/codec.py,
        exactly what its encoder writes): a prefix block (nbytes == unit_bytes) holds block_size tokens,
        a chunk as many as its size says. A size that is neither, or a block whose engine bytes are not
        just its K and V, is charged as it is (the worker cannot encode it and does not store it)."""
        from kvplug.tiers.codec import make_codec

        c = make_codec(codec)
        if c is None or not (self.chunk_token_bytes and self.kv_heads and self.head_dim):
            return nbytes
        tokens = self.block_size if nbytes == self.unit_bytes else self._chunk_tokens(nbytes)
        tail = nbytes - tokens * self.chunk_token_bytes
        if tokens <= 0 or tail < 0 or (nbytes == self.unit_bytes and tail):
            return nbytes
        return c.encoded_nbytes(self.num_layers, tokens, self.kv_heads, self.head_dim, tail)

    def _chunk_tokens(self, nbytes: int) -> int:
        tokens = nbytes // self.chunk_token_bytes
        while tokens > 0 and self.chunk_bytes(tokens) > nbytes:  # the cluster sidecar grows with the tokens
            tokens -= 1
        return tokens if tokens > 0 and self.chunk_bytes(tokens) == nbytes else 0

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
            chunk_token_bytes=2 * len(layer_names) * spec.num_kv_heads * spec.head_size * spec.dtype.itemsize,
            kv_heads=spec.num_kv_heads, head_dim=spec.head_size, itemsize=spec.dtype.itemsize,
            cluster_tokens=cfg.blend.blend_cluster_tokens if cfg.blend.enabled else 0,
        )
