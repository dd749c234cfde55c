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
    ],
)
def test_bad_values_name_the_key_and_allowed_values(extra, match):
    with pytest.raises(ValueError, match=match):
        KVPlugConfig.from_dict(extra)


def test_unusable_disk_path(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory|cannot create"):
        KVPlugConfig.from_dict({"disk_path": str(f)})
    with pytest.raises(ValueError, match="cannot create"):
        KVPlugConfig.from_dict({"disk_path": str(f / "sub")})
    with pytest.raises(ValueError, match="disk_bytes=0"):
        KVPlugConfig.from_dict({"disk_path": str(tmp_path / "d"), "disk_bytes": 0})


def test_every_key_is_documented_in_the_readme():
    import dataclasses
    from pathlib import Path

    from kvplug.config import TierConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in [f.name for f in dataclasses.fields(TierConfig)] + ["model_id", "namespaces"]:
        assert f"| `{name}` |" in readme, name
