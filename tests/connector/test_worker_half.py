"""WorkerHalf on CPU tensors shaped like vLLM's CPU KV cache, driven by hand-built metadata (no
engine): blocks and chunks through rows, disk and back, synchronous and asynchronous loads,
failures that must never leave wrong KV in place."""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "blend"))
from fakes import BS, facts  # noqa: E402
from test_blender import Toy  # noqa: E402

from kvplug.blend.blender import Blender  # noqa: E402
from kvplug.config import KVPlugConfig  # noqa: E402
from kvplug.connector.metadata import (BlendPlan, BlockLoad, BlockSave, ChunkRef, ChunkSave,  # noqa: E402
                                       KVPlugMetadata)
from kvplug.connector.worker import WorkerHalf  # noqa: E402
from kvplug.tiers.disk import unit_path  # noqa: E402

F = facts(num_layers=3, kv_heads=2, head_dim=8, num_blocks=32)


def worker(tmp_path=None, cpu_rows=8, **extra):
    cfg = {"cpu_bytes": cpu_rows * F.unit_bytes, **extra}
    if tmp_path is not None:
        cfg["disk_path"] = str(tmp_path / "disk")
    w = WorkerHalf(KVPlugConfig.from_dict(cfg), F, 0, "test:layout")
    g = torch.Generator().manual_seed(0)
    caches = {n: torch.randn((F.num_blocks, 2, BS, 16), generator=g).to(torch.bfloat16) for n in F.layer_names}
    w.register(caches)
    return w


def block_of(w, b):
    return torch.stack([c[b] for c in w.caches])


def test_a_block_saved_to_a_row_loads_into_another_block_byte_for_byte():
    w = worker()
    want = block_of(w, 3).clone()
    w.save(KVPlugMetadata(saves=[BlockSave("r", b"k" * 32, 3, (5,), (), 0.0)]))
    w.load(KVPlugMetadata(loads=[BlockLoad("r", b"k" * 32, 7, "cpu", (5,))]))
    assert torch.equal(block_of(w, 7), want) and not w.take_load_errors()


def test_a_row_reused_by_another_unit_is_a_failed_load_never_its_bytes():
    w = worker()
    before = block_of(w, 7).clone()
    w.save(KVPlugMetadata(saves=[BlockSave("r", b"a" * 32, 3, (5,), (), 0.0)]))
    w.save(KVPlugMetadata(saves=[BlockSave("r", b"b" * 32, 4, (5,), (), 0.0)]))  # row 5 reused
    w.load(KVPlugMetadata(loads=[BlockLoad("r", b"a" * 32, 7, "cpu", (5,))]))
    assert w.take_load_errors() == {7} and torch.equal(block_of(w, 7), before)
    assert w.take_worker_meta().redo == [("r", b"a" * 32)]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_disk_loads_land_in_the_step_or_when_get_finished_says_so(tmp_path, asynchronous):
    w = worker(tmp_path, cpu_rows=0)
    want = block_of(w, 2).clone()
    w.save(KVPlugMetadata(saves=[BlockSave("a", b"d" * 32, 2, (), ("disk",), 0.0)]))
    w.stores["disk"].flush()
    meta = KVPlugMetadata(loads=[BlockLoad("b", b"d" * 32, 9, "disk", ())], async_reqs=["b"] if asynchronous else [])
    w.load(meta)
    done = set()
    for _ in range(200):  # the background read lands within a few steps
        done |= w.finished_loads()
        if done or not asynchronous:
            break
        time.sleep(0.01)
    assert done == ({"b"} if asynchronous else set())
    assert torch.equal(block_of(w, 9), want) and not w.take_load_errors()


def test_a_step_with_a_failed_load_saves_nothing(tmp_path):
    w = worker(tmp_path)
    w.load(KVPlugMetadata(loads=[BlockLoad("a", b"x" * 32, 4, "disk", ())]))  # no such file
    w.save(KVPlugMetadata(saves=[BlockSave("a", b"y" * 32, 5, (1,), ("disk",), 0.0)]))
    assert w.take_load_errors() == {4}
    assert sorted(w.take_worker_meta().redo) == [("a", b"x" * 32), ("a", b"y" * 32)]
    assert not unit_path(tmp_path / "disk", b"y" * 32, 0).exists()


def with_blender(w):
    toy = Toy()
    w.blender = Blender(toy)
    w.chunk_layout = w._loader.chunk_layout = "chunk-test"
    return toy


def chunk_save(key, begin, end, rows, to_disk=False):
    return ChunkSave("a", key, begin, end, [0, 1, 2, 3], rows, ("disk",) if to_disk else (), 0.0,
                     (end - begin) * toy_token_bytes())


def toy_token_bytes():
    return 2 * Toy.num_layers * Toy.num_kv_heads * Toy.head_dim * 4  # fp32 toy


def test_a_chunk_is_saved_across_rows_and_to_disk_and_read_back_for_a_blend(tmp_path):
    w = worker(tmp_path)
    toy = with_blender(w)
    g = torch.Generator().manual_seed(1)
    n = 40  # 40 fp32 toy tokens: more bytes than one row, so the unit spans several rows
    for i in range(Toy.num_layers):
        toy.write_kv(i, torch.randn(n, 2, 8, generator=g), torch.randn(n, 2, 8, generator=g), torch.arange(n))
    nbytes = n * toy_token_bytes()
    rows = tuple(range(-(-nbytes // w.rows.row_bytes)))
    assert len(rows) > 1
    w.save(KVPlugMetadata(chunk_saves=[ChunkSave("a", b"c" * 32, 0, n, [0, 1, 2, 3], rows, ("disk",), 0.0, nbytes)]))
    w.stores["disk"].flush()
    stored = w.blender.fmt.pack(w.blender.read_chunks([(torch.arange(n), 0)])[0])
    assert torch.equal(w.rows.read(b"c" * 32, rows).payload, stored)
    assert torch.equal(w.stores["disk"].get(b"c" * 32, "chunk-test"), stored)
    for tier, r in (("cpu", rows), ("disk", ())):
        plan = BlendPlan("b", list(range(n)), 0, n, [ChunkRef(0, n, b"c" * 32, tier, r, nbytes)], 0.0, "fixed",
                         [0, 1, 2, 3], [5, 6])
        toy.written.clear()
        w.load(KVPlugMetadata(blends=[plan]))
        assert not w.take_load_errors() and w.take_stats().data["blend_requests"] == 1
        torch.testing.assert_close(toy.written_kv(), w.blender.fmt.kv(stored))  # ratio 0, at position 0


def test_load_seconds_leave_the_blend_to_blend_seconds(monkeypatch):
    """A step with a block load and a blend: the blend's time (a blender that takes 0.3 s of a fake
    clock) counts in blend_seconds only, so the two counters add up instead of counting it twice."""
    import kvplug.connector.worker as worker_mod

    w = worker()
    with_blender(w)
    n = 8
    w.save(KVPlugMetadata(saves=[BlockSave("r", b"k" * 32, 3, (5,), (), 0.0)]))
    clock = [100.0]

    def tick():
        clock[0] += 0.001
        return clock[0]
    monkeypatch.setattr(worker_mod.time, "perf_counter", tick)
    run_batch = w.blender.run_batch

    def slow_run_batch(jobs):
        clock[0] += 0.3
        return run_batch(jobs)
    monkeypatch.setattr(w.blender, "run_batch", slow_run_batch)
    plan = BlendPlan("b", list(range(n)), 0, n, [ChunkRef(0, n, None)], 1.0, "fixed", [0, 1, 2, 3], [5, 6])
    w.take_stats()
    w.load(KVPlugMetadata(loads=[BlockLoad("r", b"k" * 32, 7, "cpu", (5,))], blends=[plan]))
    stats = w.take_stats().data
    assert stats["blend_requests"] == 1 and 0.3 < stats["blend_seconds"] < 0.31
    assert 0 < stats["load_seconds"] < 0.01
    # Every token recomputed, each attending to those before it: 0 + 1 + ... + 7 pairs.
    assert w.take_worker_meta().blends == [(pytest.approx(stats["blend_seconds"]), 1, n, n, sum(range(n)))]


def test_a_blend_whose_chunk_cannot_be_loaded_fails_its_blocks_not_the_engine(tmp_path):
    w = worker(tmp_path)
    with_blender(w)
    plan = BlendPlan("b", list(range(40)), 0, 40, [ChunkRef(0, 40, b"z" * 32, "disk", (), 40 * toy_token_bytes())],
                     0.0, "fixed", [0, 1, 2, 3], [5])
    w.load(KVPlugMetadata(blends=[plan]))
    assert w.take_load_errors() == {0, 1, 2}  # the span's blocks: vLLM recomputes them
    assert w.take_worker_meta().redo == [("b", b"z" * 32)] and w.take_stats().data["blend_errors"] == 1


def test_a_demoted_chunk_is_written_to_disk_whole(tmp_path):
    w = worker(tmp_path)
    payload = torch.arange(3 * w.rows.row_bytes - 5, dtype=torch.int64).to(torch.uint8)
    w.rows.store(b"q" * 32, (4, 1, 6), payload, "chunk-test")
    w.load(KVPlugMetadata(tier_ops=[("disk", b"q" * 32, (4, 1, 6))]))
    w.stores["disk"].flush()
    assert torch.equal(w.stores["disk"].get(b"q" * 32, "chunk-test"), payload)


def test_an_asynchronous_blend_waits_for_blend_now_and_finishes_only_once_its_kv_is_written(tmp_path):
    """Its chunks come from disk in the background; when they land the worker reports them fetched
    and waits: every tensor-parallel rank must blend in the same step, which the scheduler names
    (blend_now). Only after that step's blend wrote the KV does get_finished report the request."""
    w = worker(tmp_path)
    toy = with_blender(w)
    g = torch.Generator().manual_seed(2)
    n = 24
    for i in range(Toy.num_layers):
        toy.write_kv(i, torch.randn(n, 2, 8, generator=g), torch.randn(n, 2, 8, generator=g), torch.arange(n))
    nbytes = n * toy_token_bytes()
    w.save(KVPlugMetadata(chunk_saves=[ChunkSave("a", b"c" * 32, 0, n, [0, 1, 2, 3], (), ("disk",), 0.0, nbytes)]))
    w.stores["disk"].flush()
    toy.written.clear()
    plan = BlendPlan("b", list(range(n)), 0, n, [ChunkRef(0, n, b"c" * 32, "disk", (), nbytes)], 0.0, "fixed",
                     [4, 5, 6, 7], [5])
    w.load(KVPlugMetadata(blends=[plan], async_reqs=["b"]))
    deadline = time.monotonic() + 10
    while not w._fetched and time.monotonic() < deadline:
        assert w.finished_loads() == set()  # fetched or not: not finished before its blend
        time.sleep(0.01)
    assert w.finished_loads() == set() and toy.written == {}
    assert w.take_worker_meta().fetched == {"b": 1}
    assert w.take_worker_meta() is None  # reported once
    w.load(KVPlugMetadata(blend_now=["b"]))
    assert set(toy.written) == set(range(Toy.num_layers)) and toy.written[0][0].tolist() == list(range(64, 64 + n))
    assert w.finished_loads() == {"b"} and w.finished_loads() == set()
