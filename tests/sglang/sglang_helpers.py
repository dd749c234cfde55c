"""Shared pieces of the SGLang backend tests: SGLang's own config and key functions, our backend
and SGLang's HiCacheFile on the same host pool.

    storage_config(extra, tp_rank=0, tp_size=1, mla=False, metrics=False)   SGLang's HiCacheStorageConfig
    kvplug_backend(pool, **extra) -> KVPlugHiCacheStorage   built the way SGLang's dynamic loader builds it
    file_backend(pool, path) -> HiCacheFile                  SGLang's built-in file backend (the reference)
    sglang_keys(tokens, page_size, cache_salt=None) -> list[str]   SGLang's page keys for a token list
    slots(pool, pages) -> Tensor       host token indices of the given pages, as SGLang passes them
"""
from __future__ import annotations

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_storage_hash_str, storage_namespace_seed

LOADER = {"backend_name": "kvplug", "module_path": "kvplug.sglang.backend",
          "class_name": "KVPlugHiCacheStorage", "interface_v1": 1}


def storage_config(extra=None, tp_rank=0, tp_size=1, mla=False, metrics=False, model="tiny-llama"):
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=metrics,
                                is_page_first_layout=False, model_name=model, extra_config=extra)


def kvplug_backend(pool, tp_rank=0, tp_size=1, mla=False, metrics=False, **extra):
    """Through SGLang's factory ('dynamic' backend), then register_mem_pool_host, as its cache
    controller does."""
    cfg = storage_config({**LOADER, **extra}, tp_rank=tp_rank, tp_size=tp_size, mla=mla, metrics=metrics)
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    backend.register_mem_pool_host(pool)
    return backend


def file_backend(pool, path) -> HiCacheFile:
    backend = HiCacheFile(storage_config({"file_storage_path": str(path)}), file_path=str(path))
    backend.register_mem_pool_host(pool)
    return backend


def sglang_keys(tokens: list[int], page_size: int, cache_salt: str | None = None) -> list[str]:
    return get_storage_hash_str(tokens, storage_namespace_seed(None, cache_salt), page_size=page_size)


def slots(pool, pages) -> torch.Tensor:
    return torch.cat([torch.arange(p * pool.page_size, (p + 1) * pool.page_size) for p in pages]) \
        if len(pages) else torch.empty(0, dtype=torch.int64)
