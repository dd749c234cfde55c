"""kvplug configuration: frozen dataclasses built from vLLM's `kv_connector_extra_config`.

Every key a user may put in `kv_connector_extra_config` is a field below, with its default;
the README's table is generated from the same field docs. Unknown keys and bad values fail
start-up with a ValueError that names the key and what is allowed.

    KVPlugConfig.from_dict(extra)      validate and build (the only constructor users reach)
    KVPlugConfig.to_dict()             the resolved values, for logs and `kvplug stats`
    request_blend(blend_config, kv_transfer_params)   one request's blend settings (or opt-out)
    request_saves(kv_transfer_params)                 whether a request's KV may be saved
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from kvplug.blend.policies import POLICIES as _RECOMPUTE
from kvplug.core.chunking import CHUNKING_MODES, MAX_WINDOW
from kvplug.tiers.policies import POLICIES as _EVICTION

# The names come from the registries, so a new policy needs no second list here.
EVICTION_POLICIES = tuple(sorted(_EVICTION))
RECOMPUTE_POLICIES = tuple(_RECOMPUTE)
DISK_WRITE_MODES = ("through", "on_evict")
KV_CODECS = ("none", "int8", "int4")  # kvplug/tiers/codec.py CODECS (config stays free of torch)
# Keys of earlier kvplug versions that now fail start-up with a message saying what replaced them.
REMOVED_KEYS = {
    "blend_cpu_bytes": "chunk KV now shares cpu_bytes with prefix blocks (one budget, one eviction policy); "
                       "drop the key and size cpu_bytes for both",
    "blend_disk_bytes": "chunk KV now shares disk_bytes with prefix blocks (one budget, one eviction policy); "
                        "drop the key and size disk_bytes for both",
}


@dataclass(frozen=True)
class TierConfig:
    cpu_bytes: int = 4_000_000_000
    """Bytes of host memory for the CPU tier, all tensor-parallel ranks together as disk_bytes counts
    them (each rank holds cpu_bytes / TP of its own KV shard); 0 disables it (saves go straight to disk)."""
    disk_path: str | None = None
    """Directory of the disk tier (None disables it). Shared by every engine pointed at it."""
    disk_bytes: int = 50_000_000_000
    """Byte cap of what this engine keeps in `disk_path` (only used with disk_path)."""
    eviction_policy: str = "lru"
    """Eviction order of both tiers: lru, lfu, fifo, arc, s3fifo or cost_aware."""
    disk_write: str = "through"
    """`through`: every saved block is also written to disk (asynchronously), so other engines
    and restarts see it at once. `on_evict`: written only when the CPU tier evicts it."""
    disk_fsync: bool = False
    """fsync each disk file before it becomes visible (survives power loss, costs throughput)."""
    disk_rescan_s: float = 2.0
    """Seconds between looks at disk_path for units other engines sharing it wrote or deleted
    (a background thread lists the folders that changed; lookups never touch the file system).
    0: only this engine's own units and those found at start-up are known."""
    disk_codec: str = "none"
    """KV compression of units in the disk tier: none, int8 or int4 (KIVI-style group quantization,
    kvplug/tiers/codec.py); disk_bytes then holds about 1.9x (int8) or 3.2x (int4) the KV."""
    remote_url: str | None = None
    """Redis-protocol store shared across machines (redis://, rediss://, unix://, redis+cluster://;
    Valkey works too). None disables the remote tier. Every saved block is written to it."""
    remote_namespace: str = "kvplug"
    """Prefix of every key kvplug writes in the remote store."""
    remote_ttl_s: float = 0.0
    """Expiry of remote entries in seconds (0 = none; the store's own eviction still applies)."""
    remote_codec: str = "none"
    """KV compression of units in the remote store: none, int8 or int4 (as disk_codec)."""
    remote_timeout_ms: float = 50.0
    """A remote lookup or read slower than this is a miss; after a failure the store is left
    alone for a few seconds (lookups miss at once) and then reconnected."""
    async_loads: bool = True
    """Load units found on disk or in the remote store in the background: the request waits
    (vLLM's async-load path) while every other request's step goes on. false: every load is
    done before the step's forward pass, as CPU-tier loads always are."""
    tiers: dict = field(default_factory=dict)
    """More tiers, by registered name, each with its options: {"<name>": {...}} (kvplug/tiers/tier.py;
    the built-in disk and remote tiers are configured by the keys above). Looked up after them."""


@dataclass(frozen=True)
class BlendConfig:
    """Blending of cached chunk KV at any position (CacheBlend). User keys are the field names,
    except `enabled`, which users write as `blend` (see BLEND_USER_KEYS)."""
    enabled: bool = False
    """Blend cached chunk KV into prompts at any position, recomputing a fraction of its tokens
    (CacheBlend); user key `blend`."""
    chunking: str = "separator"
    """How prompts are cut into chunks: `separator` (where chunk_separator occurs) or `content`
    (content-defined cuts from a rolling hash of the tokens: no separator needed)."""
    chunk_separator: str = " # # "
    """Prompts are split into chunks where this text occurs; the part after the last one is the
    question and is always computed (chunking `separator`)."""
    content_chunk_window: int = 16
    """Tokens the rolling hash of `content` chunking looks at (1 to 64): a passage's cuts past
    its first this many tokens depend only on its own tokens."""
    content_chunk_min_tokens: int = 32
    """`content` chunks have at least this many tokens (no cut closer to the previous one)."""
    content_chunk_target_tokens: int = 64
    """Expected length of a `content` chunk in tokens (more than content_chunk_min_tokens)."""
    content_chunk_max_tokens: int = 256
    """`content` chunks have at most this many tokens (a cut is forced past it)."""
    recompute_ratio: float = 0.15
    """Fraction (0 to 1) of each blended request's cached-chunk tokens whose KV is recomputed."""
    recompute_policy: str = "query"
    """Which tokens are recomputed (kvplug/blend/policies.py): `query` (default: the question's
    attention), `mixed`, `epic`, `fixed` (CacheBlend) or `adaptive` (Cache-Craft); README "Blending"."""
    blend_check_layer: int = 1
    """Layer at which KV deviation is scored (policies that use it); layers up to it run on all
    tokens. Must be below the model's layer count."""
    blend_chunk_head_tokens: int = 2
    """Tokens at the start of every chunk but the first that policies with chunk heads (`query`,
    `mixed`, `epic`) always recompute, within the budget (EPIC's sink tokens; the default covers
    the default separator's two tokens)."""
    blend_cluster_tokens: int = 16
    """Tokens per key cluster kept with every stored chunk (k-means of each layer's keys, for the
    relevance pass at long contexts); 0 stores chunks without clusters."""
    blend_cluster_min_tokens: int = 16384
    """Blend spans of at least this many tokens score the question's attention through the chunks'
    key clusters instead of every token (faster, approximate; measured in the README); 0: never."""
    blend_min_chunk_tokens: int = 16
    """Chunks shorter than this many tokens are not cached on their own (always recomputed)."""
    blend_cost_gate: bool = True
    """Blend a run of cached chunks only where the engine's own measurements (its forward passes'
    time per token, its blends' time per job, span token and recomputed token) predict blending
    it is faster than prefilling it; the rest vLLM prefills. With it, cached chunks after one no
    tier holds are blended too (the missing one recomputed in the same pass) where that pays.
    false: claim every cached chunk up to the first missing one, whatever it costs."""
    blend_async: bool = False
    """Blends go through vLLM's asynchronous load path: a claimed request waits while every other
    request's steps go on, and its blend runs (batched) in a later step on every rank, then the
    request resumes. false: blends run before the forward pass of the step that claims them."""
    blend_audit_rate: float = 0.01
    """Share (0 to 1) of blended requests the quality guard audits: their span is also computed
    exactly (scratch memory, never the engine's cache) and the question's next-token distribution
    compared under exact and blended KV; KL and top-1 agreement go to /metrics. 0: no audits."""
    blend_max_kl: float = 0.0
    """Quality guard controller (0: off): while the mean audited KL (nats) of the last few audits is
    above this, the engine's recompute ratio floor rises one step (0.15, 0.3, 0.5, 0.75, 1.0);
    below a quarter of it, it falls back. Needs blend_audit_rate > 0."""


# User key in kv_connector_extra_config -> BlendConfig field.
BLEND_USER_KEYS = {("blend" if f.name == "enabled" else f.name): f.name
                   for f in dataclasses.fields(BlendConfig)}


@dataclass(frozen=True)
class NamespaceQuota:
    """Byte caps for the units of one tenant (one cache_salt) in each tier, and their lifetime."""
    cpu_bytes: int | None = None
    disk_bytes: int | None = None
    ttl_s: float | None = None


@dataclass(frozen=True)
class KVPlugConfig:
    tiers: TierConfig = field(default_factory=TierConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    """Chunk blending; its keys sit flat in kv_connector_extra_config like the tier keys."""
    namespaces: dict[str, NamespaceQuota] = field(default_factory=dict)
    """Per-tenant quotas, keyed by cache_salt ("" = requests without one):
    {"tenant-a": {"cpu_bytes": 1e9, "disk_bytes": 1e10, "ttl_s": 3600}}. A tenant at its quota
    evicts its own units first, so it cannot push other tenants' KV out; past ttl_s its units are
    not served (and expire in the remote store)."""
    model_id: str | None = None
    """Name of the model in cache keys (default: the served model path). Engines that serve the
    same weights from different paths set the same model_id to share KV."""

    @classmethod
    def from_dict(cls, extra: dict[str, Any] | None, *, source: str = "kv_connector_extra_config",
                  keys: frozenset[str] | None = None, caller_keys: frozenset[str] = frozenset()) -> "KVPlugConfig":
        """`source` names the option in messages; `keys` limits the kvplug keys a caller accepts (the
        SGLang backend has no CPU tier or blending); `caller_keys` are the caller's own keys: allowed
        here, parsed by the caller."""
        extra = {k: v for k, v in (extra or {}).items() if k not in caller_keys}
        removed = sorted(set(extra) & set(REMOVED_KEYS))
        if removed:
            raise ValueError(f"{source}: {removed[0]!r} is no longer a key: {REMOVED_KEYS[removed[0]]}")
        known = _field_names(TierConfig) | set(BLEND_USER_KEYS) | {"model_id", "namespaces"}
        known = known if keys is None else known & keys
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys are {', '.join(sorted(known | caller_keys))}"
            )
        tier_args = {k: extra[k] for k in _field_names(TierConfig) - {"tiers"} if k in extra}
        tiers = TierConfig(**{k: _coerce(TierConfig, k, v) for k, v in tier_args.items()},
                           tiers=_parse_tier_options(extra.get("tiers")))
        _validate_tiers(tiers)
        blend = BlendConfig(**{f: _coerce(BlendConfig, f, extra[k], name=k)
                               for k, f in BLEND_USER_KEYS.items() if k in extra})
        _validate_blend(blend, tiers)
        model_id = extra.get("model_id")
        if model_id is not None and (not isinstance(model_id, str) or not model_id):
            raise ValueError(f"model_id={model_id!r}: must be a non-empty string")
        return cls(tiers=tiers, blend=blend, namespaces=_parse_namespaces(extra.get("namespaces")),
                   model_id=model_id)

    def to_dict(self) -> dict[str, Any]:
        namespaces = {ns: dataclasses.asdict(q) for ns, q in self.namespaces.items()}
        blend = {k: getattr(self.blend, f) for k, f in BLEND_USER_KEYS.items()}
        return {**dataclasses.asdict(self.tiers), **blend, "namespaces": namespaces,
                "model_id": self.model_id}


def _parse_namespaces(value: Any) -> dict[str, NamespaceQuota]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"namespaces={value!r}: must map cache_salt -> {{cpu_bytes, disk_bytes}}")
    out = {}
    allowed = _field_names(NamespaceQuota)
    for ns, quota in value.items():
        if not isinstance(quota, dict) or set(quota) - allowed:
            raise ValueError(f"namespaces[{ns!r}]={quota!r}: allowed keys are {', '.join(sorted(allowed))}")
        out[str(ns)] = NamespaceQuota(**{k: _parse_quota_value(f"namespaces[{ns!r}].{k}", v) for k, v in quota.items()})
    return out


def _parse_quota_value(key: str, value: Any) -> int | float:
    if not key.endswith(".ttl_s"):
        return _parse_bytes(key, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= sys.float_info.max:
        raise ValueError(f"{key}={value!r}: must be a positive number of seconds")
    return float(value)


def _parse_tier_options(value: Any) -> dict[str, dict]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f"tiers={value!r}: must map a registered tier name -> its options {{...}}")
    return {str(k): dict(v) for k, v in value.items()}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _coerce(cls, field_name: str, value: Any, name: str | None = None) -> Any:
    """JSON gives 4e9 as a float and booleans as bools: accept what a user would write.

    `name` is the user's key in messages when it differs from the field name."""
    key = name or field_name
    default = next(f.default for f in dataclasses.fields(cls) if f.name == field_name)
    if key.endswith("_bytes"):
        return _parse_bytes(key, value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: allowed values are true, false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r}: must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= sys.float_info.max:
            raise ValueError(f"{key}={value!r}: must be a non-negative number")
        return float(value)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key}={value!r}: must be a string")
    return value


def _parse_bytes(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}={value!r}: must be a number of bytes, e.g. 4e9")
    if not 0 <= value <= sys.float_info.max or value != int(value):  # also NaN, inf, ints past float range
        raise ValueError(f"{key}={value!r}: must be a whole, non-negative number of bytes")
    return int(value)


def _validate_tiers(t: TierConfig) -> None:
    if t.eviction_policy not in EVICTION_POLICIES:
        raise ValueError(
            f"eviction_policy={t.eviction_policy!r}: allowed values are {', '.join(EVICTION_POLICIES)}"
        )
    if t.disk_write not in DISK_WRITE_MODES:
        raise ValueError(f"disk_write={t.disk_write!r}: allowed values are {', '.join(DISK_WRITE_MODES)}")
    for key in ("disk_codec", "remote_codec"):
        if getattr(t, key) not in KV_CODECS:
            raise ValueError(f"{key}={getattr(t, key)!r}: allowed values are {', '.join(KV_CODECS)}")
    if t.disk_path is not None:
        if not t.disk_path:
            raise ValueError("disk_path='': give a directory, or leave the key out to disable the disk tier")
        if t.disk_bytes <= 0:
            raise ValueError(f"disk_bytes={t.disk_bytes}: must be > 0 when disk_path is set")
        _check_dir_usable(t.disk_path)
    if t.cpu_bytes == 0 and t.disk_path is None and t.remote_url is None and not t.tiers:
        raise ValueError("cpu_bytes=0 and no disk_path, remote_url or tiers: at least one tier must be enabled")
    if t.remote_url is not None:
        _check_remote_url(t.remote_url)
    if not t.remote_namespace:
        raise ValueError("remote_namespace='': must be a non-empty string")
    if t.tiers:
        from kvplug.tiers.tier import configured_tiers  # the specs check their own options

        configured_tiers(t)


def request_blend(b: BlendConfig, params: Any) -> tuple[BlendConfig | None, list | None]:
    """The engine's blend settings with a request's `kv_transfer_params` applied: (settings, or
    None when the request opts out with "blend": false; its "chunk_ends", unchecked, or None).
    Bad values raise ValueError naming kv_transfer_params.<key>, as bad engine keys do."""
    params = params or {}
    if not isinstance(params, dict):
        raise ValueError(f"kv_transfer_params={params!r}: must be an object")
    if not _coerce(BlendConfig, "enabled", params.get("blend", True), name="kv_transfer_params.blend"):
        return None, None
    over = {k: _coerce(BlendConfig, k, params[k], name=f"kv_transfer_params.{k}")
            for k in ("recompute_ratio", "recompute_policy") if k in params}
    b = dataclasses.replace(b, **over)
    _check_recompute(b, prefix="kv_transfer_params.")
    return b, params.get("chunk_ends")


def request_saves(params: Any) -> bool:
    """Whether a request's KV may be saved to kvplug's tiers: its kv_transfer_params "save"
    (default true; false keeps a one-off or private prompt out of every tier, it still loads).
    A bad value raises ValueError naming kv_transfer_params.save."""
    params = params if isinstance(params, dict) else {}
    return _coerce(BlendConfig, "enabled", params.get("save", True), name="kv_transfer_params.save")


def _check_recompute(b: BlendConfig, prefix: str = "") -> None:
    if not 0.0 <= b.recompute_ratio <= 1.0:
        raise ValueError(f"{prefix}recompute_ratio={b.recompute_ratio!r}: must be a number from 0 to 1")
    if b.recompute_policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"{prefix}recompute_policy={b.recompute_policy!r}: "
                         f"allowed values are {', '.join(RECOMPUTE_POLICIES)}")


def _validate_blend(b: BlendConfig, t: TierConfig) -> None:
    if not isinstance(b.chunk_separator, str) or not b.chunk_separator:
        raise ValueError(f"chunk_separator={b.chunk_separator!r}: must be a non-empty string")
    _check_chunking(b)
    _check_recompute(b)
    if b.blend_check_layer < 0:
        raise ValueError(f"blend_check_layer={b.blend_check_layer!r}: must be an integer >= 0")
    if b.blend_min_chunk_tokens < 1:
        raise ValueError(f"blend_min_chunk_tokens={b.blend_min_chunk_tokens!r}: must be an integer >= 1")
    if b.blend_chunk_head_tokens < 0:
        raise ValueError(f"blend_chunk_head_tokens={b.blend_chunk_head_tokens!r}: must be an integer >= 0")
    if not 0 <= b.blend_cluster_tokens <= 4096:
        raise ValueError(f"blend_cluster_tokens={b.blend_cluster_tokens!r}: must be an integer from 0 to 4096")
    if b.blend_cluster_min_tokens < 0:
        raise ValueError(f"blend_cluster_min_tokens={b.blend_cluster_min_tokens!r}: must be an integer >= 0")
    if not 0.0 <= b.blend_audit_rate <= 1.0:
        raise ValueError(f"blend_audit_rate={b.blend_audit_rate!r}: must be a number from 0 to 1")
    if b.blend_max_kl and not b.blend_audit_rate:
        raise ValueError("blend_max_kl > 0 needs blend_audit_rate > 0 (the guard acts on audited blends)")
    if b.blend_cluster_min_tokens and not b.blend_cluster_tokens:
        raise ValueError("blend_cluster_min_tokens > 0 needs blend_cluster_tokens > 0 (no clusters are stored)")


def _check_chunking(b: BlendConfig) -> None:
    if b.chunking not in CHUNKING_MODES:
        raise ValueError(f"chunking={b.chunking!r}: allowed values are {', '.join(CHUNKING_MODES)}")
    if not 1 <= b.content_chunk_window <= MAX_WINDOW:
        raise ValueError(f"content_chunk_window={b.content_chunk_window!r}: "
                         f"must be an integer from 1 to {MAX_WINDOW}")
    if b.content_chunk_min_tokens < 1:
        raise ValueError(f"content_chunk_min_tokens={b.content_chunk_min_tokens!r}: must be an integer >= 1")
    if b.content_chunk_target_tokens <= b.content_chunk_min_tokens:
        raise ValueError(f"content_chunk_target_tokens={b.content_chunk_target_tokens!r}: must be more than "
                         f"content_chunk_min_tokens ({b.content_chunk_min_tokens})")
    if b.content_chunk_max_tokens < b.content_chunk_target_tokens:
        raise ValueError(f"content_chunk_max_tokens={b.content_chunk_max_tokens!r}: must be at least "
                         f"content_chunk_target_tokens ({b.content_chunk_target_tokens})")
    gap, w = b.content_chunk_target_tokens - b.content_chunk_min_tokens, b.content_chunk_window
    if gap >= 1 << w:  # the hash has `window` bits: a candidate at most every 2**window positions
        raise ValueError(f"content_chunk_target_tokens - content_chunk_min_tokens = {gap}: a content_chunk_window "
                         f"of {w} allows at most {(1 << w) - 1}; widen the window")


def check_blend_for_model(b: BlendConfig, num_layers: int) -> None:
    """Start-up checks that need the model (the engine calls it once it knows the layer count)."""
    if b.enabled and b.blend_check_layer >= num_layers:
        raise ValueError(f"blend_check_layer={b.blend_check_layer}: this model has {num_layers} layers, "
                         f"so it must be at most {num_layers - 1}")


def _check_remote_url(url: str) -> None:
    schemes = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "valkey", "valkeys")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in schemes or not rest:
        raise ValueError(f"remote_url={url!r}: must look like redis://host:6379/0 (schemes: {', '.join(schemes)})")


def _check_dir_usable(path: str) -> None:
    """Fail at start-up, not at the first save, when the cache directory cannot be used."""
    if os.path.exists(path) and not os.path.isdir(path):
        kind = "a regular file" if os.path.isfile(path) else "not a directory"
        raise ValueError(f"disk_path={path!r}: exists and is {kind}; give a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"disk_path={path!r}: cannot create the directory ({e.strerror})") from e
    if not os.path.isdir(path):
        raise ValueError(f"disk_path={path!r}: exists and is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"disk_path={path!r}: directory is not writable by this process")
