"""The backend's extra-config goes through kvplug's one parser: the same values are accepted and
refused with the same messages as the vLLM connector's; SGLang's loader keys are stripped."""
import pytest

from kvplug.config import KVPlugConfig
from kvplug.sglang.config import SOURCE, TIER_KEYS, parse_extra_config

LOADER = {"backend_name": "kvplug", "module_path": "kvplug.sglang.backend",
          "class_name": "KVPlugHiCacheStorage", "interface_v1": 1}


def test_loader_keys_are_stripped_and_tier_keys_parsed(tmp_path):
    cfg = parse_extra_config({**LOADER, "disk_path": str(tmp_path / "kv"), "disk_bytes": 2e9,
                              "eviction_policy": "s3fifo", "remote_url": "redis://127.0.0.1:1/0",
                              "remote_timeout_ms": 20, "namespace": "team-a",
                              "namespaces": {"team-a": {"disk_bytes": 1e9, "ttl_s": 60}}})
    t = cfg.kvplug.tiers
    assert (t.disk_bytes, t.eviction_policy, t.remote_timeout_ms) == (2_000_000_000, "s3fifo", 20.0)
    assert cfg.namespace == "team-a" and cfg.interface_v1
    assert cfg.kvplug.namespaces["team-a"].ttl_s == 60.0


@pytest.mark.parametrize("extra", [
    {"eviction_policy": "mru"}, {"disk_bytes": -1}, {"disk_bytes": "4GB"}, {"disk_fsync": "yes"},
    {"remote_url": "http://x"}, {"remote_ttl_s": -1}, {"remote_timeout_ms": "fast"}, {"model_id": ""},
    {"namespaces": {"a": {"disk": 1}}}, {"namespaces": {"a": {"ttl_s": 0}}}, {"remote_namespace": ""},
])
def test_bad_values_give_the_connectors_message(extra, tmp_path):
    extra = {"disk_path": str(tmp_path / "kv"), **extra}
    with pytest.raises(ValueError) as theirs:
        KVPlugConfig.from_dict(extra)
    with pytest.raises(ValueError) as ours:
        parse_extra_config({**LOADER, **extra})
    assert str(ours.value) == str(theirs.value)


def test_an_unknown_key_names_the_option_and_the_allowed_keys(tmp_path):
    with pytest.raises(ValueError) as e:
        parse_extra_config({"disk_path": str(tmp_path), "disk_byte": 1})
    msg = str(e.value)
    assert msg.startswith(f"{SOURCE}: unknown key(s) 'disk_byte'; allowed keys are ")
    for key in TIER_KEYS | {"namespace", "backend_name", "interface_v1"}:
        assert key in msg
    assert "cpu_bytes" not in msg and "recompute_ratio" not in msg


@pytest.mark.parametrize("key, value, why", [
    ("cpu_bytes", 1e9, "host pool is the CPU tier"), ("disk_write", "on_evict", "no on_evict"),
    ("blend", True, "vLLM connector feature"), ("recompute_ratio", 0.2, "vLLM connector feature"),
])
def test_vllm_only_keys_are_refused_with_the_reason(key, value, why, tmp_path):
    with pytest.raises(ValueError, match=f"{key} is not used by the SGLang backend.*{why}"):
        parse_extra_config({"disk_path": str(tmp_path), key: value})


@pytest.mark.parametrize("extra, match", [
    ({}, "set disk_path and/or remote_url"),
    ({"remote_url": "redis://h:1/0", "namespace": 5}, "namespace=5: must be a string"),
    ({"remote_url": "redis://h:1/0", "interface_v1": "yes"}, "interface_v1='yes': allowed values are 0, 1"),
    ({"remote_url": "redis://h:1/0", "namespaces": {"a": {"cpu_bytes": 1}}}, r"namespaces\['a'\].cpu_bytes"),
])
def test_backend_specific_mistakes_are_named(extra, match):
    with pytest.raises(ValueError, match=match):
        parse_extra_config(extra)


def test_a_non_object_extra_config_is_refused():
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_extra_config(["disk_path"])


def test_the_connectors_messages_still_name_kv_connector_extra_config():
    with pytest.raises(ValueError, match=r"^kv_connector_extra_config: unknown key\(s\) 'namespace'"):
        KVPlugConfig.from_dict({"namespace": "a"})
