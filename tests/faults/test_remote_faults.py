"""The remote store dies (SIGKILL) and comes back on the same port while one vLLM engine keeps serving.

The engine pauses before the steps marked "wait" (fault_helpers.StepDriver), so the test kills and
restarts a real redis-server between steps. The CPU tier holds 3 units (one prompt), so which tier
serves each step is known: outputs must equal vLLM alone's throughout, and the counters show the
remote tier missing while it is down and saving and hitting again once it is back.
"""
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from fault_helpers import StepDriver, shared_baseline
from redis_server import RedisServer
from test_offload_e2e import BLOCK, ENV, P1, P2, P3, assert_same_outputs, model, n_blocks, unit_bytes  # noqa: F401

pytestmark = pytest.mark.e2e
BREAKER_S = 5.0  # RemoteStore / RemoteIndex default back-off after a failure


@pytest.fixture(scope="module")
def baseline(model, tmp_path_factory):
    """vLLM alone (one engine run shared by every fault and soak test of this pytest process)."""
    return shared_baseline(tmp_path_factory, model)


def test_redis_killed_and_restarted_mid_run(model, n_blocks, unit_bytes, baseline, tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    extra = {"cpu_bytes": 3 * unit_bytes, "remote_url": server.url, "remote_namespace": "fault"}
    steps = [
        {"prompts": [P1]},                                             # 0 up: P1 -> CPU + remote
        {"prompts": [P2], "reset_prefix_cache": True, "wait": True},   # 1 down: P2 evicts P1 from CPU
        {"prompts": [P1], "reset_prefix_cache": True},                 # 2 down: P1 is a miss
        {"prompts": [P1], "reset_prefix_cache": True},                 # 3 down: P1 from the CPU tier
        {"prompts": [P3], "reset_prefix_cache": True, "wait": True},   # 4 back: P3 -> CPU + remote
        {"prompts": [P1], "reset_prefix_cache": True},                 # 5 P1 evicts P3 from CPU
        {"prompts": [P3], "reset_prefix_cache": True},                 # 6 P3 from the remote store
    ]
    engine = StepDriver(tmp_path, "engine", {"model": model, "extra": extra, "steps": steps}, ENV).start()
    try:
        engine.wait_step(0)
        keys_before = len(server.client().keys("fault:*"))
        server.kill()
        engine.go(1)
        engine.wait_step(3)
        server.restart()  # same port, empty (nothing persisted): P1's remote copy is gone
        time.sleep(BREAKER_S + 1)  # let the engine's circuit breakers allow a new try
        engine.go(4)
        out = engine.finish()
        keys_after = len(server.client().keys("fault:*"))
    finally:
        engine.kill()
        server.stop()

    prompt_of = ["P1", "P2", "P1", "P1", "P3", "P1", "P3"]
    for step, name in zip(out, prompt_of):
        assert_same_outputs(step, baseline[name])
    c = [s["counters"] for s in out]
    assert keys_before == 3 and c[0]["saved_blocks"] == 3
    # Down: no remote hit, writes failed or dropped (counted), requests served by recompute / CPU.
    assert all(c[i].get("remote_hit_tokens", 0) == 0 for i in (1, 2, 3))
    assert sum(c[i].get("remote_errors", 0) for i in (1, 2, 3)) > 0, c[1:4]
    assert c[2].get("cpu_hit_tokens", 0) == 0 and c[3]["cpu_hit_tokens"] == 3 * BLOCK
    # Back: saves reach the new server and a unit evicted from the CPU tier is loaded from it.
    assert c[4].get("remote_hit_tokens", 0) == 0 and c[4]["saved_blocks"] == 3
    assert c[6]["remote_hit_tokens"] == 3 * BLOCK and c[6].get("load_errors", 0) == 0, c[6]
    assert keys_after == 6  # P3 and P1 written again after the restart
    # One warning per outage and component (scheduler lookups, worker reads/writes), not one per request.
    assert engine.log.read_text().count("unreachable (") == 2
