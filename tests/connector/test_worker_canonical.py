"""WorkerHalf on the canonical KV path (PagedBlockIO rows of tokens, PagedKV blend writes), forced
on CPU tensors laid out as vLLM 0.32's CUDA caches (make_vllm_caches, torch backend), driven by
hand-built metadata like test_worker_half. The oracle is the opaque-byte path (io="opaque",
the CPU backend's) on the same engine data; chunk KV is checked by plain indexing of the caches.
LazyBlockIO makes transfers land late, as on the GPU's side streams, to check the fences.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "blend"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tiers"))
from fakes import BS, facts  # noqa: E402
from lazy_io import LazyBlockIO  # noqa: E402
from test_blend_paged import PagedToy, cache_kv  # noqa: E402

from kvplug.blend.blender import Blender  # noqa: E402
from kvplug.config import KVPlugConfig  # noqa: E402
from kvplug.connector.engine_facts import EngineFacts  # noqa: E402
from kvplug.connector.metadata import (BlendPlan, BlockLoad, BlockSave, ChunkRef, ChunkSave,  # noqa: E402
                                       KVPlugMetadata)
from kvplug.connector.worker import WorkerHalf  # noqa: E402
from kvplug.ops.kv_layout import clone_caches, make_vllm_caches  # noqa: E402
from kvplug.ops.rope import rerotate_keys_ref  # noqa: E402
from kvplug.tiers.paged_io import is_canonical_tag  # noqa: E402

F = facts(num_layers=3, kv_heads=2, head_dim=8, num_blocks=32)  # bf16


def engine(layout="LBNHC", seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return make_vllm_caches(F.num_layers, F.num_blocks, BS, 2, 8, dtype, "cpu", layout, generator=g)


def worker(caches, io="canonical", disk=None, cpu_rows=8, facts_=F):
    cfg = {"cpu_bytes": cpu_rows * facts_.unit_bytes, **({"disk_path": str(disk)} if disk else {})}
    w = WorkerHalf(KVPlugConfig.from_dict(cfg), facts_, 0, "test:layout", io=io)
    w.register(dict(zip(facts_.layer_names, caches)))
    return w


def block_of(w, b):
    return torch.stack([c[b] for c in w.caches]).clone()


def save(key, block, rows=(), to_disk=False):
    return BlockSave("r", key, block, rows, ("disk",) if to_disk else (), 0.0)


def steps(w, *metas):
    for meta in metas:
        w.load(meta)
        w.save(meta)


@pytest.mark.parametrize("io,want", [("auto", "KV path opaque: whole engine blocks as bytes"),
                                     ("canonical", "KV path canonical: blocks as canonical tokens")])
def test_register_says_once_which_path_it_chose_and_why(caplog, io, want):
    with caplog.at_level("INFO", logger="kvplug"):
        w = worker(engine("BLHNC"), io)
    lines = [r.getMessage() for r in caplog.records if "KV path" in r.getMessage()]
    assert len(lines) == 1 and want in lines[0], lines
    assert lines[0].endswith("cpu cache: the backend's block interior may be packed, copied as bytes" if io == "auto"
                             else "BLHNC bfloat16 cache on cpu (forced)")
    assert w.io_kind == ("opaque" if io == "auto" else "canonical")


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
def test_blocks_through_rows_land_as_on_the_opaque_path(layout):
    src = engine(layout)
    metas = (KVPlugMetadata(saves=[save(b"a" * 32, 3, (5,)), save(b"b" * 32, 4, (1,))]),
             KVPlugMetadata(loads=[BlockLoad("r", b"a" * 32, 7, "cpu", (5,)), BlockLoad("r", b"b" * 32, 9, "cpu", (1,))]))
    done = {}
    for io in ("opaque", "canonical"):
        w = worker(clone_caches(src), io)
        want = (block_of(w, 3), block_of(w, 4))
        steps(w, *metas)
        assert w.io_kind == io and not w.take_load_errors()
        assert torch.equal(block_of(w, 7), want[0]) and torch.equal(block_of(w, 9), want[1])
        done[io] = (w.caches[0]._base.clone(), w.rows.blocks.buffer[[5, 1]].clone(), w.layout)
    assert torch.equal(done["canonical"][0], done["opaque"][0])  # the whole engine buffer
    assert not torch.equal(done["canonical"][1], done["opaque"][1])  # rows of tokens, not engine bytes
    assert is_canonical_tag(done["canonical"][2]) and not is_canonical_tag(done["opaque"][2])


@pytest.mark.parametrize("asynchronous", [False, True])
def test_disk_round_trip_with_and_without_a_cpu_row(tmp_path, asynchronous):
    w = worker(engine(seed=1), disk=tmp_path / "disk")
    want = [block_of(w, 2), block_of(w, 6)]
    steps(w, KVPlugMetadata(saves=[save(b"d" * 32, 2, (), True), save(b"e" * 32, 6, (3,), True)]))
    w.stores["disk"].flush()
    reqs = ["b"] if asynchronous else []
    w.load(KVPlugMetadata(loads=[BlockLoad("b", b"d" * 32, 9, "disk", (0,)), BlockLoad("b", b"e" * 32, 11, "disk", ())],
                          async_reqs=reqs))
    w._loader._pool.submit(lambda: None).result()  # one reader thread: the read before has landed
    assert w.finished_loads() == set(reqs)
    assert torch.equal(block_of(w, 9), want[0]) and torch.equal(block_of(w, 11), want[1])
    assert not w.take_load_errors() and w.rows.holds(b"d" * 32, (0,))  # promoted into row 0
    w.load(KVPlugMetadata(loads=[BlockLoad("c", b"d" * 32, 12, "cpu", (0,))]))
    assert torch.equal(block_of(w, 12), want[0])


@pytest.mark.parametrize("writer,reader", [("opaque", "canonical"), ("canonical", "opaque")])
def test_a_unit_saved_by_one_path_is_a_miss_for_the_other(tmp_path, writer, reader):
    src = engine(seed=2)
    w = worker(clone_caches(src), writer, disk=tmp_path / "disk")
    steps(w, KVPlugMetadata(saves=[save(b"x" * 32, 5, (), True)]))
    w.close()
    r = worker(clone_caches(src), reader, disk=tmp_path / "disk")
    before = block_of(r, 8)
    r.load(KVPlugMetadata(loads=[BlockLoad("q", b"x" * 32, 8, "disk", ())]))
    assert r.take_load_errors() == {8} and torch.equal(block_of(r, 8), before)


def test_a_failed_load_never_leaves_wrong_kv(tmp_path):
    w = worker(engine(seed=3), disk=tmp_path / "disk")
    before = block_of(w, 7)
    steps(w, KVPlugMetadata(saves=[save(b"a" * 32, 3, (5,))]), KVPlugMetadata(saves=[save(b"b" * 32, 4, (5,))]))
    w.load(KVPlugMetadata(loads=[BlockLoad("r", b"a" * 32, 7, "cpu", (5,)),  # row 5 now holds unit b
                                 BlockLoad("r", b"z" * 32, 8, "disk", ())]))  # no such file
    assert w.take_load_errors() == {7, 8} and torch.equal(block_of(w, 7), before)
    assert sorted(w.take_worker_meta().redo) == [("r", b"a" * 32), ("r", b"z" * 32)]


def test_a_demoted_row_goes_to_disk_and_loads_back(tmp_path):
    w = worker(engine(seed=4), disk=tmp_path / "disk")
    want = block_of(w, 3)
    steps(w, KVPlugMetadata(saves=[save(b"m" * 32, 3, (5,))]), KVPlugMetadata(tier_ops=[("disk", b"m" * 32, (5,))]))
    w.stores["disk"].flush()
    w.load(KVPlugMetadata(loads=[BlockLoad("r", b"m" * 32, 11, "disk", ())]))
    assert not w.take_load_errors() and torch.equal(block_of(w, 11), want)


def test_late_transfers_never_put_or_load_the_wrong_bytes(tmp_path):
    """Saves whose rows fill late, disk puts of those rows, a demotion, loads whose blocks land at
    the next forward, a promotion into a row a load still reads: every block ends as saved."""
    w = worker(engine(seed=5), disk=tmp_path / "disk")
    io = w.blocks.io = LazyBlockIO([c for c in w.caches], BS)
    want = {3: block_of(w, 3), 4: block_of(w, 4)}
    w.save(KVPlugMetadata(saves=[save(b"a" * 32, 3, (5,), True), save(b"b" * 32, 4, (6,))]))
    assert io.pending() and not w.stores["disk"].exists(b"a" * 32)  # the put waits for row 5
    io.forward()
    for c in w.caches:  # the next forward overwrites the saved blocks
        c[3:5].normal_()
    w.load(KVPlugMetadata(tier_ops=[("disk", b"b" * 32, (6,))], loads=[BlockLoad("r", b"a" * 32, 7, "cpu", (5,))]))
    assert w.stores["disk"].exists(b"a" * 32)  # the next step starts with last step's puts handed to the stores
    w.stores["disk"].flush()
    w.load(KVPlugMetadata(loads=[BlockLoad("s", b"b" * 32, 9, "disk", (5,))]))  # promoted into row 5
    io.forward()
    w.load(KVPlugMetadata(loads=[BlockLoad("t", b"a" * 32, 10, "disk", ())]))
    io.forward()
    assert not w.take_load_errors()
    for block, src in ((7, 3), (9, 4), (10, 3)):
        assert torch.equal(block_of(w, block), want[src]), block
    w.close()


F32 = EngineFacts(namespace=b"n" * 32, block_size=BS, unit_bytes=BS * 2 * 3 * 2 * 8 * 4,
                  layer_names=F.layer_names, num_blocks=F.num_blocks, tp_size=1, kv_heads=2, head_dim=8, itemsize=4)


def test_a_chunk_is_read_back_from_the_paged_cache_and_blended_into_other_blocks(tmp_path):
    caches = engine(seed=6, dtype=torch.float32)  # the toy model is fp32
    w = worker(caches, disk=tmp_path / "disk", facts_=F32)
    toy = PagedToy(caches)
    w.blender, w.chunk_layout = Blender(toy), "chunk-test"
    w._loader.chunk_layout = w.chunk_layout
    n, begin = 40, 8
    src_slots = torch.arange(begin, begin + n) + BS  # blocks 1..3 hold positions begin.. of a request
    kv = cache_kv(caches, src_slots)
    kv[:, 0] = rerotate_keys_ref(kv[:, 0], torch.arange(begin, begin + n), torch.arange(n), toy.inv_freq, "neox")
    nbytes = F32.chunk_bytes(n)
    rows = tuple(range(-(-nbytes // w.rows.row_bytes)))
    w.save(KVPlugMetadata(chunk_saves=[ChunkSave("a", b"c" * 32, begin, begin + n, [1, 2, 3, 4], rows, ("disk",),
                                                 0.0, nbytes)]))
    assert toy.calls["read_kv_layers"] == 1 and toy.calls["read_kv"] == 0
    torch.testing.assert_close(w.blender.fmt.kv(w.rows.read(b"c" * 32, rows).payload), kv, rtol=1e-6, atol=1e-6)
    plan = BlendPlan("b", list(range(n)), 0, n, [ChunkRef(0, n, b"c" * 32, "cpu", rows, nbytes)], 0.0, "fixed",
                     [20, 9, 30], [5, 6])
    w.load(KVPlugMetadata(blends=[plan]))
    assert not w.take_load_errors() and toy.calls["write_rerotated"] == 1 and toy.calls["write_kv"] == 0
    pos = torch.arange(n)
    dst = torch.tensor([20, 9, 30])[pos // BS] * BS + pos % BS
    assert torch.equal(cache_kv(caches, dst), w.blender.fmt.kv(w.rows.read(b"c" * 32, rows).payload))
