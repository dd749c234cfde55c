"""What kvplug needs to know about the engine, read once from vLLM's config objects.

Both halves compute these the same way, so the scheduler's slot numbers and the worker's
host pool agree without talking to each other. vLLM's objects are read through vllm_compat.

    EngineFacts.from_vllm(vllm_config, kv_cache_config, cfg)   validated facts, or ValueError
    facts.chunk_bytes(tokens)              a stored chunk's payload bytes
    facts.stored_bytes(nbytes, codec)      a unit's payload bytes as a tier stores it under a KV codec
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kvplug.blend.chunk_format import chunk_nbytes
from kvplug.config import KVPlugConfig
from kvplug.connector import vllm_compat as compat
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

    @property
    def chunk_token_bytes(self) -> int:
        """One token's K and V of every layer in the canonical chunk layout (this rank)."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.itemsize

    def chunk_bytes(self, tokens: int) -> int:
        """A stored chunk's payload: its KV, then its key clusters when kept (the count the worker's
        ChunkFormat makes: kvplug/blend/chunk_format.py)."""
        return chunk_nbytes(self.num_layers, self.kv_heads, self.head_dim, self.itemsize, self.cluster_tokens, tokens)

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
        cache = compat.kv_cache_facts(kv_cache_config)
        engine = compat.engine_config(vllm_config)
        if engine.pp_size > 1:
            raise ValueError("KVPlugConnector does not support pipeline parallelism yet (pipeline_parallel_size > 1)")
        if engine.nnodes > 1 and cfg.tiers.disk_path:
            # Each rank writes its own file of a unit and a unit is a hit only when every rank's file is
            # there: ranks on other nodes must see the same folder.
            logger.warning("kvplug: the engine spans %d nodes: disk_path=%s must be one shared file system mounted "
                           "at the same path on every node, or no unit will ever be found on disk",
                           engine.nnodes, cfg.tiers.disk_path)
        namespace = namespace_digest(
            model=cfg.model_id or engine.model,
            revision=engine.revision,
            dtype=engine.dtype,
            kv_cache_dtype=engine.kv_dtype,
            block_size=cache.block_size,
            num_kv_heads=cache.num_kv_heads,
            head_size=cache.head_size,
            num_layers=len(cache.layer_names),
            tp_size=engine.tp_size,
            device=compat.device_type(),
            vllm=compat.vllm_version(),
        )
        return cls(
            namespace=namespace,
            block_size=cache.block_size,
            unit_bytes=cache.block_bytes * len(cache.layer_names),
            layer_names=cache.layer_names,
            num_blocks=cache.num_blocks,
            tp_size=engine.tp_size,
            kv_heads=cache.num_kv_heads, head_dim=cache.head_size, itemsize=cache.itemsize,
            cluster_tokens=kept_cluster_tokens(cfg, engine.max_model_len),
        )


def kept_cluster_tokens(cfg: KVPlugConfig, max_model_len: int) -> int:
    """Tokens per key cluster stored with each chunk, or 0: clusters serve only spans of at least
    blend_cluster_min_tokens, so an engine whose prompts cannot be that long keeps none (making
    them is most of a chunk save's cost on CPU)."""
    b = cfg.blend
    if not b.enabled or not b.blend_cluster_min_tokens or max_model_len < b.blend_cluster_min_tokens:
        return 0
    return b.blend_cluster_tokens
