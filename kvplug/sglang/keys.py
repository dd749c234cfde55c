"""What names an SGLang page in kvplug's tiers: its layout tag and its 32-byte unit key.

SGLang gives a page as a SHA-256 hex string chained over the page's tokens and the ones before
it (seeded with the request's extra_key and cache_salt since SGLang 0.5.x). The same string
names the same tokens in every engine, whatever their KV bytes look like, so kvplug's key also
covers everything the bytes depend on: the host pool's class, memory layout, dtype and page
geometry, the model, and the rank's shard. A page written by an engine that differs in any of
them has another key, and is a miss, never bytes read the wrong way.

Works on any object with the attributes of SGLang's host pools and HiCacheStorageConfig (duck
typed: this module does not import sglang).

    PageSpec                                     dtype, element count, byte size of one page
    page_spec(pool) -> PageSpec                  of the host pool's flat data page
    layout_tag(pool, storage, model_id=None)     the page layout tag (ValueError if unsupported)
    unit_layout(page_layout, namespace)          the tag stored with each unit: layout + namespace
    unit_key(namespace, page_layout, key)        kvplug's key of SGLang's page `key`
    UnitKeys(namespace, page_layout)(keys)       unit_key of many keys (the shared prefix hashed once)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from kvplug.tiers.unit_kinds import SGLANG_PREFIX

KEY_TAG = b"kvplug-sglang-page-v1"
# Host-pool attributes that shape a page's bytes; pools lack some of them (MLA has no head_num,
# MHA no kv_lora_rank): what a pool has is in its tag.
_POOL_ATTRS = ("layout", "page_size", "layer_num", "start_layer", "end_layer", "head_num", "head_dim",
               "v_head_dim", "kv_lora_rank", "qk_rope_head_dim", "size_per_token", "storage_format_tag")


@dataclass(frozen=True)
class PageSpec:
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def page_spec(pool) -> PageSpec:
    try:
        page = pool.get_dummy_flat_data_page()
    except NotImplementedError as e:
        raise ValueError(f"host pool {type(pool).__name__} has no flat data page ({e}); "
                         "kvplug's SGLang backend needs one") from e
    if not isinstance(page, torch.Tensor) or page.dim() != 1 or page.numel() == 0:
        raise ValueError(f"host pool {type(pool).__name__}: its flat data page is not a non-empty 1-D tensor")
    return PageSpec(page.dtype, page.numel())


def layout_tag(pool, storage, model_id: str | None = None) -> str:
    """`storage` is SGLang's HiCacheStorageConfig. KV of a rank-replicated model (MLA) is the same on
    every tensor-parallel rank, so its tag leaves the tp rank out and all ranks share its pages."""
    if getattr(storage, "should_split_heads", False):
        raise ValueError("tp_lcm_size with head splitting is not supported by kvplug's SGLang backend")
    spec = page_spec(pool)
    parts = [("pool", type(pool).__name__), ("dtype", str(spec.dtype)), ("page_numel", spec.numel)]
    parts += [(a, getattr(pool, a)) for a in _POOL_ATTRS if getattr(pool, a, None) is not None]
    parts += [("model", model_id or getattr(storage, "model_name", None) or "")]
    if not getattr(storage, "is_mla_model", False):
        parts += [("tp", f"{storage.tp_rank}/{storage.tp_size}")]
    parts += [("pp", f"{storage.pp_rank}/{storage.pp_size}"),
              ("cp", f"{storage.attn_cp_rank}/{storage.attn_cp_size}"),
              ("dcp", f"{getattr(storage, 'dcp_rank', 0)}/{getattr(storage, 'dcp_size', 1)}")]
    return SGLANG_PREFIX + ";".join(f"{k}={_text(v)}" for k, v in parts)


def unit_layout(page_layout: str, namespace: str) -> str:
    """The tag each unit carries: the page layout and the tenant, so a start-up scan of a shared
    folder accounts only this tenant's units against its quota (the key covers both too)."""
    return f"{page_layout};namespace={json.dumps(namespace)}"


def unit_key(namespace: str, page_layout: str, key: str) -> bytes:
    """SHA-256 over a tag and the length-prefixed namespace, layout and SGLang key: no two
    different triples give the same input bytes."""
    return UnitKeys(namespace, page_layout)([key])[0]


class UnitKeys:
    def __init__(self, namespace: str, page_layout: str):
        self._prefix = hashlib.sha256(KEY_TAG)
        for part in (namespace, page_layout):
            _update(self._prefix, part)

    def __call__(self, keys) -> list[bytes]:
        out = []
        for key in keys:
            if not isinstance(key, str) or not key:
                raise ValueError(f"SGLang page key must be a non-empty str, got {key!r}")
            h = self._prefix.copy()
            _update(h, key)
            out.append(h.digest())
        return out


def _update(h, part: str) -> None:
    b = part.encode("utf-8", "surrogatepass")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def _text(value) -> str:
    # ";" and "=" separate the tag's fields: quote any value that contains them.
    s = str(value)
    return json.dumps(s) if any(c in s for c in ';="') else s
