"""PagedBlockIO (the GPU block path: all layers per launch, canonical rows) against the worker's
current opaque-byte path (BlockRows) as the oracle, over vLLM 0.32's CUDA cache layouts built as
tensors with random data: the same blocks saved and loaded back leave the engine's cache
byte-identical, block for block, and a row holds exactly the block's K and V token by token.

On a CUDA machine every case also runs on CUDA tensors: side stream, fences, pinned and
pageable rows.
"""
import pytest
import torch

from kvplug.ops import _backend
from kvplug.ops.kv_layout import clone_caches, make_vllm_caches
from kvplug.ops.paged_kv import PagedKV
from kvplug.tiers.cpu import BlockRows
from kvplug.tiers.paged_io import PagedBlockIO, canonical_layout_tag, is_canonical_tag

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
SRC_BLOCKS, ROW_IDS, DST_BLOCKS = [7, 2, 9, 0, 4], [3, 0, 6, 1, 5], [1, 10, 5, 8, 3]  # odd, unordered


def caches(layout, dtype, device, seed, nb=11, bs=16, H=2, D=64, L=3, block_pad=0):
    g = torch.Generator().manual_seed(seed)
    return make_vllm_caches(L, nb, bs, H, D, dtype, device, layout, block_pad=block_pad, generator=g)


def base(cs):  # the whole backing buffer: padding and other blocks must stay untouched too
    return cs[0]._base


def opaque_round_trip(src, dst, src_blocks, row_ids, dst_blocks, ratio=1):
    """What the worker does today: BlockRows over the block-major caches (group_kernel_blocks)."""
    grouped = lambda cs: [c.unflatten(0, (c.shape[0] // ratio, ratio)) if ratio > 1 else c for c in cs]  # noqa: E731
    g_src = grouped(src)
    rows = BlockRows.allocate([(tuple(c.shape[1:]), c.dtype) for c in g_src], 8)
    rows.store(row_ids, g_src, src_blocks)
    out = clone_caches(dst)
    rows.load(row_ids, grouped(out), dst_blocks)
    return out, rows


def paged_round_trip(src, dst, layout, src_blocks, row_ids, dst_blocks, pin=None, block_tokens=None,
                     backend="auto"):
    io = PagedBlockIO.from_vllm(src, layout, block_tokens, backend)
    rows = io.allocate_rows(8, pin=pin)
    io.save(src_blocks, rows.buffer, row_ids).synchronize()
    out = clone_caches(dst)
    PagedBlockIO.from_vllm(out, layout, block_tokens, backend).load(rows.buffer, row_ids, dst_blocks).synchronize()
    return out, rows, io


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLNHC", "BLHNC"])
def test_round_trip_equals_the_opaque_path(layout, dtype, device):
    src, dst = caches(layout, dtype, device, 1), caches(layout, dtype, device, 2)
    want, opaque = opaque_round_trip(src, dst, SRC_BLOCKS, ROW_IDS, DST_BLOCKS)
    got, rows, io = paged_round_trip(src, dst, layout, SRC_BLOCKS, ROW_IDS, DST_BLOCKS)
    assert torch.equal(base(got), base(want))
    D = src[0].shape[-1] // 2
    for r in ROW_IDS:  # the row is the block's tokens, K then V, every layer
        for layer in range(len(src)):
            block = opaque.views[layer][r].transpose(0, 1)  # engine block [H, N, 2D] -> [N, H, 2D]
            assert torch.equal(rows.views[0][r, layer, 0], block[..., :D])
            assert torch.equal(rows.views[0][r, layer, 1], block[..., D:])
    assert rows.buffer.is_pinned() == (device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_padded_pages_and_split_kernel_blocks(device):
    """Page padding (vLLM's page_size_padded) and manager blocks of 2 kernel blocks."""
    src = caches("LBNHC", torch.bfloat16, device, 3, block_pad=40)
    dst = caches("LBNHC", torch.bfloat16, device, 4, block_pad=40)
    want, _ = opaque_round_trip(src, dst, SRC_BLOCKS, ROW_IDS, DST_BLOCKS)
    got, _, _ = paged_round_trip(src, dst, "LBNHC", SRC_BLOCKS, ROW_IDS, DST_BLOCKS)
    assert torch.equal(base(got), base(want))
    src, dst = caches("LBNHC", torch.float16, device, 5, nb=12, bs=8), caches("LBNHC", torch.float16, device, 6, nb=12, bs=8)
    want, _ = opaque_round_trip(src, dst, [5, 0, 2], [4, 1, 2], [3, 1, 0], ratio=2)
    got, _, io = paged_round_trip(src, dst, "LBNHC", [5, 0, 2], [4, 1, 2], [3, 1, 0], block_tokens=16)
    assert io.num_blocks == 6 and io.row_shape[2] == 16
    assert torch.equal(base(got), base(want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pageable rows take the pinned-staging path on CUDA only")
def test_pageable_rows_on_cuda_go_through_pinned_staging():
    src, dst = caches("LBNHC", torch.bfloat16, "cuda", 7), caches("LBNHC", torch.bfloat16, "cuda", 8)
    want, _ = opaque_round_trip(src, dst, SRC_BLOCKS, ROW_IDS, DST_BLOCKS)
    got, rows, _ = paged_round_trip(src, dst, "LBNHC", SRC_BLOCKS, ROW_IDS, DST_BLOCKS, pin=False)
    assert not rows.buffer.is_pinned() and torch.equal(base(got), base(want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams and events exist on CUDA only")
def test_fences_order_a_save_before_the_next_write_and_a_load_before_the_read():
    src = caches("LBNHC", torch.bfloat16, "cuda", 9)
    before = clone_caches(src)
    io = PagedBlockIO.from_vllm(src, "LBNHC")
    rows = io.allocate_rows(8)
    fence = io.save(SRC_BLOCKS, rows.buffer, ROW_IDS)
    fence.wait_blocks()  # the caller's stream may now overwrite the saved blocks
    for c in src:
        c.zero_()
    io.wait_rows(ROW_IDS[:2])  # the host may read those rows now
    assert torch.equal(rows.views[0][ROW_IDS[0], 0, 0].cpu(), before[0][SRC_BLOCKS[0]].transpose(0, 1)[..., :64].cpu())
    fence.wait_rows()
    io.load(rows.buffer, ROW_IDS, SRC_BLOCKS).wait_blocks()
    got = torch.stack([c[SRC_BLOCKS] for c in src])  # on the current stream, after the load
    assert torch.equal(got, torch.stack([c[SRC_BLOCKS] for c in before]))
    io.drain()
    assert io._pending == []


def test_a_row_loads_into_another_layout():
    """Rows are canonical tokens, not engine bytes: saved from LBNHC, loaded into BLHNC."""
    src, dst = caches("LBNHC", torch.float16, "cpu", 10), caches("BLHNC", torch.float16, "cpu", 11)
    io = PagedBlockIO.from_vllm(src)
    rows = io.allocate_rows(8)
    io.save(SRC_BLOCKS, rows.buffer, ROW_IDS)
    other = PagedBlockIO.from_vllm(dst, "BLHNC")
    assert other.layout_tag == io.layout_tag
    other.load(rows.buffer, ROW_IDS, DST_BLOCKS)
    slots = lambda blocks: (torch.tensor(blocks)[:, None] * 16 + torch.arange(16)).flatten()  # noqa: E731
    assert torch.equal(PagedKV(dst).read(slots(DST_BLOCKS)), PagedKV(src).read(slots(SRC_BLOCKS)))


@pytest.mark.skipif(not (_backend.has_triton() and not torch.cuda.is_available()), reason="interpreted Triton on CPU")
def test_triton_backend_round_trip():
    src, dst = caches("BLNHC", torch.bfloat16, "cpu", 12, nb=5, bs=4, L=2), caches("BLNHC", torch.bfloat16, "cpu", 13, nb=5, bs=4, L=2)
    want, _ = opaque_round_trip(src, dst, [3, 1], [0, 2], [4, 0])
    got, _, _ = paged_round_trip(src, dst, "BLNHC", [3, 1], [0, 2], [4, 0], backend="triton")
    assert torch.equal(base(got), base(want))


def test_layout_tags_never_match_the_opaque_path():
    src = caches("LBNHC", torch.bfloat16, "cpu", 0)
    io = PagedBlockIO.from_vllm(src)
    opaque = BlockRows.allocate([(tuple(c.shape[1:]), c.dtype) for c in src], 1)
    assert io.layout_tag == canonical_layout_tag(3, 16, 2, 64, torch.bfloat16) == "kv-tokens-v1[L,2,T,H,D]=3x2x16x2x64:bfloat16"
    assert is_canonical_tag(io.layout_tag) and not is_canonical_tag(opaque.layout_tag())
    assert io.row_bytes == opaque.row_bytes  # same bytes per block, read differently
    assert canonical_layout_tag(3, 16, 2, 64, torch.float16) != io.layout_tag


def test_bad_calls_name_the_shape():
    src = caches("LBNHC", torch.float32, "cpu", 0)
    io = PagedBlockIO.from_vllm(src)
    rows = io.allocate_rows(4)
    with pytest.raises(ValueError, match=r"rows of shape \(4, 10\)"):
        io.save([0], rows.buffer[:, :10], [0])
    with pytest.raises(ValueError, match=r"blocks \[11\]"):
        io.save([11], rows.buffer, [0])
    with pytest.raises(ValueError, match="row_ids"):
        io.save([1, 2], rows.buffer, [0, 0])  # two blocks into one row
    with pytest.raises(ValueError, match="blocks of shape"):
        io.load(rows.buffer, [0, 1], [2, 2])  # one block from two rows
    with pytest.raises(ValueError, match="one row per block"):
        io.load(rows.buffer, [0, 1], [2])
    with pytest.raises(ValueError, match="block_tokens=24"):
        PagedBlockIO.from_vllm(src, block_tokens=24)
    assert io.save([], rows.buffer, []).done()
    io.wait_rows([0, 1])  # nothing pending on CPU: returns at once
    io.drain()
