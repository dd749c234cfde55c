import pytest

from kvplug.config import KVPlugConfig


def test_defaults_and_json_numbers(tmp_path):
    cfg = KVPlugConfig.from_dict({"cpu_bytes": 4e9, "disk_path": str(tmp_path / "c"), "disk_bytes": 5e10,
                                  "eviction_policy": "arc"})
    assert cfg.tiers.cpu_bytes == 4_000_000_000 and cfg.tiers.disk_bytes == 50_000_000_000
    assert (tmp_path / "c").is_dir()
    assert KVPlugConfig.from_dict(None).tiers.eviction_policy == "lru"
    assert KVPlugConfig.from_dict({}).to_dict()["disk_path"] is None
    q = KVPlugConfig.from_dict({"namespaces": {"t": {"cpu_bytes": 1e9}}}).namespaces["t"]
    assert q.cpu_bytes == 1_000_000_000 and q.disk_bytes is None


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"cpu_byte": 1}, "unknown key.*'cpu_byte'.*allowed keys are"),
        ({"eviction_policy": "mru"}, "eviction_policy='mru': allowed values are arc, cost_aware, fifo, lfu, lru, s3fifo"),
        ({"cpu_bytes": -1}, "cpu_bytes=-1"),
        ({"cpu_bytes": "4GB"}, "cpu_bytes='4GB': must be a number"),
        ({"cpu_bytes": 1.5}, "whole"),
        ({"cpu_bytes": float("inf")}, "cpu_bytes"),
        ({"cpu_bytes": True}, "cpu_bytes"),
        ({"disk_write": "sometimes"}, "disk_write='sometimes': allowed values are through, on_evict"),
        ({"disk_fsync": "yes"}, "disk_fsync='yes': allowed values are true, false"),
        ({"disk_codec": "int2"}, "disk_codec='int2': allowed values are none, int8, int4"),
        ({"remote_codec": 8}, "remote_codec=8: must be a string"),
        ({"cpu_codec": "int8"}, "unknown key.*'cpu_codec'"),
        ({"disk_path": ""}, "disk_path"),
        ({"cpu_bytes": 0}, "at least one tier"),
        ({"remote_namespace": ""}, "remote_namespace"),
        ({"model_id": ""}, "model_id"),
        ({"remote_url": "http://x"}, "remote_url='http://x': must look like redis://"),
        ({"remote_ttl_s": -1}, "remote_ttl_s=-1"),
        ({"remote_timeout_ms": "fast"}, "remote_timeout_ms='fast'"),
        ({"namespaces": ["a"]}, "namespaces"),
        ({"namespaces": {"a": {"cpu": 1}}}, r"namespaces\['a'\].*allowed keys are cpu_bytes, disk_bytes"),
        ({"namespaces": {"a": {"cpu_bytes": -5}}}, r"namespaces\['a'\].cpu_bytes=-5"),
        ({"blend": "on"}, "blend='on': allowed values are true, false"),
        ({"blend": 1}, "blend=1: allowed values are true, false"),
        ({"chunk_separator": ""}, "chunk_separator='': must be a non-empty string"),
        ({"chunk_separator": None}, "chunk_separator=None"),
        ({"chunk_separator": 5}, "chunk_separator=5: must be a string"),
        ({"recompute_ratio": 1.5}, "recompute_ratio=1.5: must be a number from 0 to 1"),
        ({"recompute_ratio": -0.1}, "recompute_ratio=-0.1"),
        ({"recompute_ratio": float("nan")}, "recompute_ratio=nan"),
        ({"recompute_ratio": "0.2"}, "recompute_ratio='0.2'"),
        ({"recompute_policy": "greedy"}, "recompute_policy='greedy': allowed values are fixed, adaptive, epic, query, mixed"),
        ({"blend_check_layer": -1}, "blend_check_layer=-1: must be an integer >= 0"),
        ({"blend_check_layer": 1.5}, "blend_check_layer=1.5: must be an integer"),
        ({"blend_check_layer": True}, "blend_check_layer=True: must be an integer"),
        ({"blend_cpu_bytes": 2e9}, "'blend_cpu_bytes' is no longer a key: chunk KV now shares cpu_bytes"),
        ({"blend_disk_bytes": 1e10}, "'blend_disk_bytes' is no longer a key: chunk KV now shares disk_bytes"),
        ({"blend_min_chunk_tokens": 0}, "blend_min_chunk_tokens=0: must be an integer >= 1"),
        ({"blend_chunk_head_tokens": -1}, "blend_chunk_head_tokens=-1: must be an integer >= 0"),
        ({"async_loads": "yes"}, "async_loads='yes': allowed values are true, false"),
        ({"enabled": True}, "unknown key.*'enabled'"),
        ({"chunking": "lines"}, "chunking='lines': allowed values are separator, content"),
        ({"chunking": None}, "chunking=None: allowed values are separator, content"),
        ({"content_chunk_window": 0}, "content_chunk_window=0: must be an integer from 1 to 64"),
        ({"content_chunk_window": 65}, "content_chunk_window=65: must be an integer from 1 to 64"),
        ({"content_chunk_window": 16.0}, "content_chunk_window=16.0: must be an integer"),
        ({"content_chunk_min_tokens": 0}, "content_chunk_min_tokens=0: must be an integer >= 1"),
        ({"content_chunk_target_tokens": 32}, r"content_chunk_target_tokens=32: must be more than "
                                              r"content_chunk_min_tokens \(32\)"),
        ({"content_chunk_max_tokens": 63}, r"content_chunk_max_tokens=63: must be at least "
                                           r"content_chunk_target_tokens \(64\)"),
        ({"content_chunk_window": 4}, "content_chunk_target_tokens - content_chunk_min_tokens = 32: a "
                                      "content_chunk_window of 4 allows at most 15"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(extra, match):
    with pytest.raises(ValueError, match=match):
        KVPlugConfig.from_dict(extra)


def test_unusable_disk_path(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is a regular file; give a directory"):
        KVPlugConfig.from_dict({"disk_path": str(f)})
    with pytest.raises(ValueError, match="cannot create"):
        KVPlugConfig.from_dict({"disk_path": str(f / "sub")})
    with pytest.raises(ValueError, match="disk_bytes=0"):
        KVPlugConfig.from_dict({"disk_path": str(tmp_path / "d"), "disk_bytes": 0})


def test_disk_path_that_is_a_regular_file_fails_start_up_naming_the_key_and_leaves_it_alone(tmp_path):
    """The connector parses its extra config first thing (KVPlugConnector.__init__), so this is
    the start-up error; a symlink to a file is refused the same way."""
    import re

    f = tmp_path / "cache.bin"
    f.write_bytes(b"someone's data")
    link = tmp_path / "link"
    link.symlink_to(f)
    for path in (f, link):
        with pytest.raises(ValueError, match=re.escape(f"disk_path={str(path)!r}: exists and is a regular file; "
                                                       "give a directory")):
            KVPlugConfig.from_dict({"disk_path": str(path)})
    assert f.read_bytes() == b"someone's data" and link.is_symlink()


def test_codec_keys_default_to_none_and_name_the_tiers_codecs():
    from kvplug.config import KV_CODECS
    from kvplug.tiers.codec import CODECS

    assert KV_CODECS == CODECS
    t = KVPlugConfig.from_dict({}).tiers
    assert (t.disk_codec, t.remote_codec) == ("none", "none")
    t = KVPlugConfig.from_dict({"disk_codec": "int8", "remote_codec": "int4"}).tiers
    assert (t.disk_codec, t.remote_codec) == ("int8", "int4")


def test_every_key_is_documented_in_the_readme():
    import dataclasses
    from pathlib import Path

    from kvplug.config import BLEND_USER_KEYS, TierConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in [f.name for f in dataclasses.fields(TierConfig)] + list(BLEND_USER_KEYS) + ["model_id", "namespaces"]:
        assert f"| `{name}` |" in readme, name


def test_blend_defaults_and_round_trip():
    from kvplug.config import BLEND_USER_KEYS, BlendConfig

    b = KVPlugConfig.from_dict({}).blend
    assert b == BlendConfig()
    assert (b.enabled, b.chunk_separator, b.recompute_ratio, b.recompute_policy) == (False, " # # ", 0.15, "query")
    assert (b.blend_check_layer, b.blend_chunk_head_tokens, b.blend_min_chunk_tokens) == (1, 2, 16)
    assert b.blend_cost_gate is True and (b.blend_audit_rate, b.blend_max_kl) == (0.01, 0.0)
    extra = {"blend": True, "chunk_separator": "\n\n", "recompute_ratio": 1, "recompute_policy": "adaptive",
             "blend_check_layer": 0, "blend_chunk_head_tokens": 8, "blend_min_chunk_tokens": 1,
             "blend_cost_gate": False, "blend_audit_rate": 0.5, "blend_max_kl": 0.05, "blend_async": True}
    cfg = KVPlugConfig.from_dict(extra)
    assert cfg.blend.enabled is True and cfg.blend.recompute_ratio == 1.0
    assert isinstance(cfg.blend.recompute_ratio, float) and cfg.blend.blend_chunk_head_tokens == 8
    d = cfg.to_dict()
    assert {k: d[k] for k in BLEND_USER_KEYS} == {**extra, "recompute_ratio": 1.0, "blend_cluster_tokens": 16,
                                                  "blend_cluster_min_tokens": 16384, "chunking": "separator",
                                                  "content_chunk_window": 16, "content_chunk_min_tokens": 32,
                                                  "content_chunk_target_tokens": 64, "content_chunk_max_tokens": 256}
    assert KVPlugConfig.from_dict({k: d[k] for k in BLEND_USER_KEYS}) == cfg  # to_dict feeds from_dict


def test_check_layer_beyond_the_model_fails_naming_the_layer_count():
    from kvplug.config import check_blend_for_model

    cfg = KVPlugConfig.from_dict({"blend": True, "blend_check_layer": 30}).blend
    with pytest.raises(ValueError, match="blend_check_layer=30: this model has 30 layers, so it must be at most 29"):
        check_blend_for_model(cfg, 30)
    check_blend_for_model(cfg, 31)


def test_policy_names_come_from_the_registries():
    from kvplug.blend.policies import POLICIES as RECOMPUTE
    from kvplug.config import EVICTION_POLICIES, RECOMPUTE_POLICIES
    from kvplug.tiers.policies import POLICIES as EVICTION

    assert set(EVICTION_POLICIES) == set(EVICTION) and set(RECOMPUTE_POLICIES) == set(RECOMPUTE)


def test_request_blend_overrides_opt_out_and_bad_values():
    from kvplug.config import BlendConfig, request_blend

    base = BlendConfig(enabled=True, recompute_ratio=0.15)
    assert request_blend(base, None) == (base, None)
    assert request_blend(base, {"blend": False, "recompute_ratio": 9}) == (None, None)
    b, ends = request_blend(base, {"recompute_ratio": 1, "recompute_policy": "adaptive", "chunk_ends": [3, 9]})
    assert (b.recompute_ratio, b.recompute_policy, ends) == (1.0, "adaptive", [3, 9])
    assert b.chunk_separator == base.chunk_separator
    for params, key in [({"recompute_ratio": 7}, "recompute_ratio"), ({"recompute_ratio": "0.2"}, "recompute_ratio"),
                        ({"recompute_ratio": float("nan")}, "recompute_ratio"), ({"recompute_ratio": True}, "recompute_ratio"),
                        ({"recompute_policy": "all"}, "recompute_policy"), ({"recompute_policy": None}, "recompute_policy"),
                        ({"blend": "yes"}, "blend")]:
        with pytest.raises(ValueError, match=f"kv_transfer_params.{key}="):
            request_blend(base, params)
    with pytest.raises(ValueError, match="must be an object"):
        request_blend(base, [1])


def test_content_chunking_keys_and_their_defaults():
    from kvplug.config import BLEND_USER_KEYS

    b = KVPlugConfig.from_dict({"blend": True}).blend
    assert b.chunking == "separator"  # the default stays the separator
    assert (b.content_chunk_window, b.content_chunk_min_tokens, b.content_chunk_target_tokens,
            b.content_chunk_max_tokens) == (16, 32, 64, 256)  # measured: benchmarks/chunking.py
    extra = {"blend": True, "chunking": "content", "content_chunk_window": 12, "content_chunk_min_tokens": 16,
             "content_chunk_target_tokens": 48, "content_chunk_max_tokens": 48}
    cfg = KVPlugConfig.from_dict(extra)
    assert (cfg.blend.chunking, cfg.blend.content_chunk_max_tokens) == ("content", 48)
    d = cfg.to_dict()
    assert KVPlugConfig.from_dict({k: d[k] for k in BLEND_USER_KEYS}) == cfg


@pytest.mark.parametrize("extra, key", [({"blend_audit_rate": 1.5}, "blend_audit_rate"),
                                        ({"blend_audit_rate": 0, "blend_max_kl": 0.1}, "blend_max_kl")])
def test_bad_quality_guard_settings_name_the_key(extra, key):
    with pytest.raises(ValueError, match=key):
        KVPlugConfig.from_dict({"blend": True, **extra})
