"""A tier defined outside kvplug (tests/connector/mem_tier.py), registered and configured by name,
serves saves and loads through the real scheduler and worker halves (no engine); and the
scheduler's loop makes no file-system call for the disk tier (its view answers from memory)."""
import builtins
import os

import pytest
import torch

import mem_tier
from fakes import BS, Request, facts, started_halves, step_new
from kvplug.config import KVPlugConfig
from kvplug.connector.scheduler import SchedulerHalf
from kvplug.connector.stats import fields
from kvplug.connector.worker import WorkerHalf

F = facts(num_layers=3, kv_heads=2, head_dim=8, num_blocks=32)
PROMPT = list(range(1, 70))  # 4 full blocks of 16, then the token vLLM always computes


def halves(extra: dict) -> tuple[SchedulerHalf, WorkerHalf]:
    return started_halves(extra, F)


def step(s: SchedulerHalf, w: WorkerHalf, req: Request, blocks: list[int]):
    """One engine step of a request prefilled at once: lookup, alloc, loads, forward, saves."""
    n, is_async = s.num_matched(req, 0)
    s.after_alloc(req, blocks, n)
    meta = s.build_meta(step_new(req, blocks, n, len(req.prompt_token_ids) - n))
    w.begin_step(meta)
    w.load(meta)
    w.save(meta)
    wm = w.take_worker_meta()
    if wm is not None:
        s.on_worker_meta(wm)
    return n, is_async, meta


def block(w: WorkerHalf, b: int) -> torch.Tensor:
    return torch.stack([c[b] for c in w.caches])


@pytest.fixture(autouse=True)
def empty_tier():
    mem_tier.UNITS.clear()
    yield
    mem_tier.UNITS.clear()


def test_a_registered_tier_configured_by_name_serves_saves_and_loads():
    s, w = halves({"cpu_bytes": 0, "tiers": {"memtest": {"bytes": 1e6}}})
    _, _, meta = step(s, w, Request("a", PROMPT), [1, 2, 3, 4, 5])
    assert [x.tiers for x in meta.saves] == [("memtest",)] * 4 and len(mem_tier.UNITS) == 4
    want = [block(w, b).clone() for b in (1, 2, 3, 4)]
    n, is_async, meta = step(s, w, Request("b", PROMPT), [9, 10, 11, 12, 13])
    assert (n, is_async) == (4 * BS, False)  # the tier says its loads are quick: in the step
    assert [(x.block, x.tier) for x in meta.loads] == [(b, "memtest") for b in (9, 10, 11, 12)]
    assert all(torch.equal(block(w, b), x) for b, x in zip((9, 10, 11, 12), want))
    assert not w.take_load_errors()
    stats = w.take_stats().data
    assert stats["memtest_hit_tokens"] == 4 * BS and stats["memtest_writes"] == 4
    assert "memtest_hit_tokens" in fields()  # its counters are kvplug's, on /metrics too


def test_the_tier_is_accounted_and_evicted_by_its_capacity():
    cap = 2 * F.unit_bytes + 100
    s, w = halves({"cpu_bytes": 0, "tiers": {"memtest": {"bytes": cap}}, "eviction_policy": "fifo"})
    step(s, w, Request("a", PROMPT), [1, 2, 3, 4, 5])
    assert len(mem_tier.UNITS) == 2  # two blocks fit; a step never evicts what it pinned
    other = Request("c", [t + 1000 for t in PROMPT])
    step(s, w, other, [6, 7, 8, 9, 10])  # its blocks evict a's; the deletes run before its writes
    assert {k for _, k in mem_tier.UNITS} == set(s._reqs["c"].keys[:2])
    assert s.manager.used("memtest") <= cap and s.take_stats().data["memtest_evictions"] == 2


def test_a_unit_the_store_could_not_write_is_forgotten_by_the_scheduler():
    s, w = halves({"cpu_bytes": 0, "tiers": {"memtest": {"drop_writes": True}}})
    step(s, w, Request("a", PROMPT), [1, 2, 3, 4, 5])
    assert mem_tier.UNITS == {}
    assert s.num_matched(Request("b", PROMPT), 0) == (0, False)  # never a load that must fail


def test_units_in_the_tier_at_start_up_are_found_through_the_workers_handshake():
    s, w = halves({"cpu_bytes": 0, "tiers": {"memtest": {}}})
    step(s, w, Request("a", PROMPT), [1, 2, 3, 4, 5])
    s2, _ = halves({"cpu_bytes": 0, "tiers": {"memtest": {}}})  # a restarted engine
    assert s2.num_matched(Request("b", PROMPT), 0) == (4 * BS, False)


def test_bad_tier_names_and_options_fail_with_the_registered_names():
    with pytest.raises(ValueError, match="'nosuch' is not a registered tier; registered tiers are disk, remote, "
                                         "memtest"):
        KVPlugConfig.from_dict({"tiers": {"nosuch": {}}})
    with pytest.raises(ValueError, match="tiers.memtest: unknown option 'size'; allowed: bytes, drop_writes"):
        KVPlugConfig.from_dict({"tiers": {"memtest": {"size": 1}}})
    with pytest.raises(ValueError, match="tiers.disk: the disk tier is configured by disk_path"):
        KVPlugConfig.from_dict({"tiers": {"disk": {}}})
    with pytest.raises(ValueError, match="tiers=.*must map a registered tier name"):
        KVPlugConfig.from_dict({"tiers": ["memtest"]})


def test_the_schedulers_loop_makes_no_file_system_call(tmp_path, monkeypatch):
    s, w = halves({"cpu_bytes": 0, "disk_path": str(tmp_path / "disk"), "disk_rescan_s": 0, "async_loads": False})
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append((name, args[:1]))
            raise AssertionError(f"{name} called in the scheduler's loop")
        return call
    for mod, name in ((os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"), (os, "open"),
                      (builtins, "open")):
        monkeypatch.setattr(mod, name, refuse(name))
    a, b = Request("a", PROMPT), Request("b", PROMPT)
    assert s.num_matched(a, 0) == (0, False)
    s.after_alloc(a, [1, 2, 3, 4, 5], 0)
    saves = s.build_meta(step_new(a, [1, 2, 3, 4, 5], 0, 69))
    assert s.num_matched(b, 0) == (4 * BS, False)  # found on disk: from the view, not the folder
    s.after_alloc(b, [9, 10, 11, 12, 13], 4 * BS)
    loads = s.build_meta(step_new(b, [9, 10, 11, 12, 13], 4 * BS, 5))
    s.finished(a)
    s.take_stats()
    monkeypatch.undo()
    assert calls == []
    assert [x.tiers for x in saves.saves] == [("disk",)] * 4 and [x.tier for x in loads.loads] == ["disk"] * 4
    w.close()
