"""The worker's block path (kvplug/tiers/block_io.py) without vLLM: which IO the caches get, the
canonical path against the opaque-byte path as the oracle over vLLM 0.32's CUDA layouts with
random data, and its fences under LazyBlockIO (transfers that land late, as on side streams).

On a CUDA machine the round trips also run on CUDA tensors, where the path is PagedBlockIO with
its streams and pinned rows (tools/gpu_check.py runs this file there).
"""
import pytest
import torch

from kvplug.ops.kv_layout import clone_caches, make_vllm_caches
from kvplug.tiers.block_io import BlockPath, OpaqueBlockIO, choose_block_io
from kvplug.tiers.paged_io import PagedBlockIO, is_canonical_tag
from lazy_io import LazyBlockIO

DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
L, NB, BS, H, D = 3, 12, 16, 2, 32


def caches(layout="LBNHC", dtype=torch.bfloat16, device="cpu", seed=0, **kw):
    return make_vllm_caches(L, NB, BS, H, D, dtype, device, layout, generator=torch.Generator().manual_seed(seed), **kw)


def path(cs, kind, n_rows=8, layout="test"):
    io = choose_block_io(cs, cs, BS, kind).io
    return BlockPath(io, n_rows, layout)


def block_bytes(cs, b):
    return torch.stack([c[b] for c in cs])


def test_auto_takes_the_opaque_path_on_cpu_and_forced_canonical_takes_vllm_cuda_layouts():
    cs = caches()
    auto = choose_block_io(cs, cs, BS)
    assert auto.kind == "opaque" and isinstance(auto.io, OpaqueBlockIO) and "packed" in auto.why
    forced = choose_block_io(cs, cs, BS, "canonical")
    assert forced.kind == "canonical" and isinstance(forced.io, PagedBlockIO)
    assert forced.why.startswith("LBNHC bfloat16 cache on cpu") and is_canonical_tag(forced.io.layout_tag)
    assert not is_canonical_tag(auto.io.layout_tag) and auto.io.row_bytes == forced.io.row_bytes
    assert choose_block_io(caches("BLHNC"), caches("BLHNC"), BS, "canonical").why.startswith("BLHNC")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto picks the canonical path for CUDA caches only")
def test_auto_takes_the_canonical_path_on_cuda():
    cs = caches(device="cuda")
    choice = choose_block_io(cs, cs, BS)
    assert choice.kind == "canonical" and choice.io.allocate_rows(1).buffer.is_pinned()


def test_caches_the_kernels_cannot_take_fall_back_to_opaque_or_raise_when_forced():
    fp8_like = [torch.zeros(NB, H, BS, 2 * D, dtype=torch.uint8) for _ in range(L)]  # kv_cache_dtype=fp8
    legacy = [torch.zeros(2, NB, BS, H, D) for _ in range(L)]  # vLLM <= 0.10's [2, nb, bs, H, D]
    for cs in (fp8_like, legacy):
        with pytest.raises(ValueError, match="shape|dtype"):
            choose_block_io(cs, cs, BS, "canonical")
    with pytest.raises(ValueError, match="allowed values are auto, opaque, canonical"):
        choose_block_io(fp8_like, fp8_like, BS, "fast")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,pad", [("LBNHC", 0), ("LBHNC", 0), ("BLNHC", 0), ("BLHNC", 0), ("LBNHC", 40)])
def test_save_then_load_into_other_blocks_equals_the_opaque_path(layout, pad, device):
    src = caches(layout, device=device, seed=1, block_pad=pad)
    results = {}
    for kind in ("opaque", "canonical"):
        cs = clone_caches(src)
        p = path(cs, kind)
        p.save([b"a", b"b", b"c"], [7, 2, 9], [3, 0, 6])
        p.load([3, 0, 6], [1, 10, 5])
        p.drain()
        results[kind] = (cs[0]._base.cpu(), p.rows.blocks.buffer.clone())
        assert torch.equal(block_bytes(cs, [1, 10, 5]), block_bytes(src, [7, 2, 9]))
    assert torch.equal(results["canonical"][0], results["opaque"][0])  # the whole buffer, padding included
    # The rows are not the engine's bytes (H > 1): the canonical path really ran.
    assert not torch.equal(results["canonical"][1][[3, 0, 6]], results["opaque"][1][[3, 0, 6]])


@pytest.mark.parametrize("device", DEVICES)
def test_fetched_payloads_load_like_rows(device):
    cs = caches(device=device, seed=2)
    want = block_bytes(cs, 4).clone()
    p = path(cs, "canonical")
    p.save([b"k"], [4], [2])
    payload = p.rows.copy_row(2)
    p.load_payloads([payload], [8])
    p.drain()
    assert torch.equal(block_bytes(cs, 8), want)


def lazy_path(cs, n_rows=8):
    p = path(cs, "canonical", n_rows)
    p.io = LazyBlockIO(cs, BS)
    return p


def test_a_deferred_put_sees_the_saved_bytes_not_the_rows_before_the_save():
    cs = caches(seed=3)
    p = lazy_path(cs)
    want = block_bytes(cs, 5).clone()
    got = []
    p.later(p.save([b"k"], [5], [1]), [1], lambda: got.append(p.rows.copy_row(1)))
    assert got == [] and p.io.pending() == 2  # nothing has landed: the put waits
    p.io.forward()
    for c in cs:  # the next forward overwrites block 5: the save read it before
        c[5].normal_()
    p.settle()
    p.load_payloads(got, [0])
    p.io.forward()
    assert torch.equal(block_bytes(cs, 0), want)


def test_a_host_write_to_a_row_waits_for_the_load_still_reading_it():
    cs = caches(seed=4)
    p = lazy_path(cs)
    p.save([b"a"], [2], [5])
    p.io.drain()
    want = block_bytes(cs, 2).clone()
    p.load([5], [7])  # lands at the next forward
    other = torch.randint(0, 255, (p.rows.row_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    p.rows.store(b"other", (5,), other, "chunk")
    p.io.forward()
    assert torch.equal(block_bytes(cs, 7), want)


def test_a_save_into_a_row_runs_the_deferred_put_of_its_old_unit_first():
    cs = caches(seed=5)
    p = lazy_path(cs)
    first = block_bytes(cs, 3).clone()
    got = []
    p.later(p.save([b"a"], [3], [4]), [4], lambda: got.append(p.rows.copy_row(4)))
    p.save([b"b"], [6], [4])  # row 4 reused: the put of unit a goes out first, with a's bytes
    p.io.drain()
    p.load_payloads(got, [11])
    p.io.forward()
    assert len(got) == 1 and torch.equal(block_bytes(cs, 11), first)


def test_lazy_io_catches_a_block_reused_without_its_fence():
    """The control: io.save without wait_blocks lets the next forward overwrite the block before
    the save reads it, and LazyBlockIO shows it (so the tests above would catch a missing fence)."""
    cs = caches(seed=6)
    p = lazy_path(cs)
    before = block_bytes(cs, 5).clone()
    p.io.save([5], p.rows.blocks.buffer, [1])  # no fence.wait_blocks()
    p.io.forward()
    for c in cs:
        c[5].zero_()
    p.io.drain()
    p.io.load(p.rows.blocks.buffer, [1], [0]).synchronize()
    assert not torch.equal(block_bytes(cs, 0), before)
