"""The SGLang backend's settings, from `--hicache-storage-backend-extra-config`.

The tier keys are parsed by kvplug's one config parser (KVPlugConfig.from_dict), with the same
validation and messages as the vLLM connector's `kv_connector_extra_config`; this module only
removes the keys SGLang's dynamic loader puts there, reads the backend's own `namespace`, and
refuses the vLLM-only keys with a message that says why.

    parse_extra_config(extra) -> BackendConfig   validate and build; ValueError naming the key
    BackendConfig                                 kvplug: KVPlugConfig, namespace, interface_v1
    SOURCE                                        the option's name, as messages spell it
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvplug.config import BLEND_USER_KEYS, KVPlugConfig

SOURCE = "hicache-storage-backend-extra-config"

# Put there by SGLang's dynamic loader (sglang/srt/mem_cache/storage/backend_factory.py and
# cache_controller.py): read by SGLang, ignored here.
LOADER_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1"})
OWN_KEYS = frozenset({"namespace"})

# The kvplug keys that mean something here. SGLang's host pool is the CPU tier and SGLang
# writes every page through to storage itself, so the CPU-tier and write-mode keys do not.
TIER_KEYS = frozenset({"disk_path", "disk_bytes", "eviction_policy", "disk_fsync", "remote_url",
                       "remote_namespace", "remote_ttl_s", "remote_timeout_ms", "namespaces", "model_id"})
_WHY_NOT = {
    "cpu_bytes": "SGLang's host pool is the CPU tier: size it with --hicache-ratio or --hicache-size",
    "disk_write": "SGLang writes every page it backs up to storage: there is no on_evict mode",
}
_BLEND_WHY = "blending is a vLLM connector feature; SGLang's backend stores prefix pages only"


@dataclass(frozen=True)
class BackendConfig:
    kvplug: KVPlugConfig
    namespace: str = ""
    """This engine's tenant: part of every unit key (engines with different namespaces never
    see each other's pages on a shared disk_path or Redis), and the `namespaces` entry whose
    quota and TTL apply to its pages."""
    interface_v1: bool = False
    """SGLang calls batch_get_v1/batch_set_v1 (zero-copy into the host pool) when set."""


def parse_extra_config(extra: dict[str, Any] | None) -> BackendConfig:
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"{SOURCE}: must be a JSON object, got {type(extra).__name__}")
    extra = dict(extra or {})
    _refuse_vllm_only(extra)
    cfg = KVPlugConfig.from_dict(extra, source=SOURCE, keys=TIER_KEYS, caller_keys=LOADER_KEYS | OWN_KEYS)
    if cfg.tiers.disk_path is None and cfg.tiers.remote_url is None:
        raise ValueError(f"{SOURCE}: set disk_path and/or remote_url; kvplug has nowhere to store pages")
    for ns, quota in cfg.namespaces.items():
        if quota.cpu_bytes is not None:
            raise ValueError(f"namespaces[{ns!r}].cpu_bytes: {_WHY_NOT['cpu_bytes']}")
    namespace = extra.get("namespace", "")
    if not isinstance(namespace, str):
        raise ValueError(f"namespace={namespace!r}: must be a string")
    interface_v1 = extra.get("interface_v1", 0)
    if isinstance(interface_v1, str) or interface_v1 not in (0, 1, True, False):
        raise ValueError(f"interface_v1={interface_v1!r}: allowed values are 0, 1")
    return BackendConfig(kvplug=cfg, namespace=namespace, interface_v1=bool(interface_v1))


def _refuse_vllm_only(extra: dict[str, Any]) -> None:
    for key in sorted(extra):
        if key in _WHY_NOT:
            raise ValueError(f"{SOURCE}: {key} is not used by the SGLang backend ({_WHY_NOT[key]})")
        if key in BLEND_USER_KEYS:
            raise ValueError(f"{SOURCE}: {key} is not used by the SGLang backend ({_BLEND_WHY})")
