"""Two vLLM engines in separate processes that share nothing but a redis-server on loopback."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_server import RedisServer, redis_available  # noqa: E402
from test_offload_e2e import BLOCK, P1, assert_same_outputs, baseline, drive, model, n_blocks, unit_bytes  # noqa: E402,F401

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not redis_available(), reason="redis-server not installed (make test installs it)")]


def test_two_engines_share_kv_through_redis_only(model, n_blocks, unit_bytes, baseline, tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        # No disk tier: the remote store is the only thing the two engines have in common.
        extra = {"cpu_bytes": 8 * unit_bytes, "remote_url": server.url, "remote_namespace": "e2e"}
        (writer,) = drive(tmp_path, "writer", {"model": model, "extra": extra, "steps": [{"prompts": [P1]}]})
        assert writer["counters"]["saved_blocks"] == 3
        (reader,) = drive(tmp_path, "reader", {"model": model, "extra": extra, "steps": [{"prompts": [P1]}]})
        assert_same_outputs(reader, baseline["P1"])
        assert reader["counters"]["remote_hit_tokens"] == 3 * BLOCK
        assert reader["counters"].get("load_errors", 0) == 0
        assert len(server.client().keys("e2e:*")) == 3


def test_dead_remote_store_is_a_miss_not_a_failure(model, n_blocks, unit_bytes, baseline, tmp_path):
    server = RedisServer(tmp_path / "redis")  # never started: connection refused
    extra = {"cpu_bytes": 8 * unit_bytes, "remote_url": server.url}
    first, again = drive(tmp_path, "dead", {"model": model, "extra": extra, "steps": [
        {"prompts": [P1]}, {"prompts": [P1], "reset_prefix_cache": True}]})
    assert_same_outputs(first, baseline["P1"])
    assert_same_outputs(again, baseline["P1"])
    assert again["counters"]["cpu_hit_tokens"] == 3 * BLOCK  # the local tier still serves
    assert first["counters"].get("remote_hit_tokens", 0) == 0
