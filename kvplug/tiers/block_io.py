"""The worker's block transfers between vLLM's paged caches and the CPU tier's rows, and which
path carries them: chosen once, at register time, from the cache tensors.

Two block IOs with one interface (PagedBlockIO's: allocate_rows / save / load / wait_blocks /
wait_rows / drain, each save or load returning an IOFence):
    canonical  PagedBlockIO (paged_io.py): CUDA caches in a vLLM 0.32 KVCacheLayout; every layer
               in one gather/scatter launch, pinned rows, side streams; rows are kvplug's
               canonical tokens [L, 2, T, H, D] (layout tag kv-tokens-v1[...])
    opaque     OpaqueBlockIO: whole engine blocks as bytes (BlockRows), synchronous; the CPU
               backend's path (its block interior may be ISA-packed) and the fallback for any
               cache the kernels do not take (fp8, other layouts)
Rows saved by one are never read by the other: the layout tags differ, so such a unit is a miss.

    choose_block_io(caches, grouped, block_tokens, request="auto") -> Choice(io, kind, why)
    OpaqueBlockIO(grouped)                BlockRows' copies behind PagedBlockIO's interface
    BlockPath(io, n_rows, layout)         the worker's transfers, fences kept:
        .rows                             the CPU tier's UnitRows (host access waits for fences)
        .save(keys, blocks, rows)         blocks -> rows; the engine's stream waits for the reads
        .save_staged(blocks) -> (fence, BlockRows)   blocks -> fresh rows (units with no CPU row)
        .load(rows, blocks)               rows -> blocks; the engine's stream waits for the writes
        .load_payloads(payloads, blocks)  fetched unit bytes (one row each) -> blocks
        .later(fence, rows, fn)           fn() once the fence's rows are filled (a deferred put)
        .settle(rows=None) / .settle_done()   run the deferred fns (on those rows / whose rows are in)
        .drain()                          every deferred fn and transfer, on the host
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from kvplug.ops.kv_layout import detect_vllm_layout
from kvplug.tiers.cpu import BlockRows, UnitRows
from kvplug.tiers.paged_io import IOFence, PagedBlockIO

BLOCK_IOS = ("auto", "opaque", "canonical")


class Choice(NamedTuple):
    io: object  # PagedBlockIO | OpaqueBlockIO
    kind: str  # "canonical" | "opaque"
    why: str  # for the one log line


def choose_block_io(caches: Sequence[torch.Tensor], grouped: Sequence[torch.Tensor], block_tokens: int,
                    request: str = "auto") -> Choice:
    """caches: vLLM's registered per-layer tensors (kernel blocks); grouped: the same viewed with
    vLLM's blocks as dim 0 (the opaque path copies those). "auto" takes the canonical path for
    CUDA caches in a vLLM CUDA layout, else the opaque one; "canonical" forced (tests run it on
    CPU tensors laid out as vLLM's CUDA caches) raises ValueError when the kernels cannot take them."""
    if request not in BLOCK_IOS:
        raise ValueError(f"block io={request!r}: allowed values are {', '.join(BLOCK_IOS)}")
    device = caches[0].device
    if request == "opaque":
        return Choice(OpaqueBlockIO(grouped), "opaque", "requested")
    if request == "auto" and device.type != "cuda":
        return Choice(OpaqueBlockIO(grouped), "opaque",
                      f"{device.type} cache: the backend's block interior may be packed, copied as bytes")
    try:
        layout = detect_vllm_layout(caches)
        io = PagedBlockIO.from_vllm(caches, None, block_tokens)
    except ValueError as e:
        if request == "canonical":
            raise
        return Choice(OpaqueBlockIO(grouped), "opaque", f"the kernels do not take this cache ({e})")
    dtype = str(io.spec.dtype).removeprefix("torch.")
    return Choice(io, "canonical", f"{layout} {dtype} cache on {device}" + (" (forced)" if request != "auto" else ""))


class OpaqueBlockIO:
    """Whole engine blocks as opaque bytes: BlockRows.store / load over the block-major caches,
    on the caller's stream, so every fence it returns is already done."""

    def __init__(self, grouped: Sequence[torch.Tensor]):
        self.caches = list(grouped)
        self.templates = [(tuple(c.shape[1:]), c.dtype) for c in self.caches]
        empty = BlockRows.allocate(self.templates, 0)
        self.row_bytes, self.layout_tag = empty.row_bytes, empty.layout_tag()
        self._cuda = self.caches[0].device.type == "cuda"

    def allocate_rows(self, n: int, pin: bool | None = None) -> BlockRows:
        return BlockRows.allocate(self.templates, n, pin=self._cuda if pin is None else pin)

    def save(self, blocks, rows: torch.Tensor, row_ids) -> IOFence:
        BlockRows(rows, self.templates).store(list(row_ids), self.caches, list(blocks))
        return IOFence()

    def load(self, rows: torch.Tensor, row_ids, blocks) -> IOFence:
        BlockRows(rows, self.templates).load(list(row_ids), self.caches, list(blocks))
        return IOFence()

    def wait_blocks(self, stream=None) -> None:
        return

    def wait_rows(self, row_ids) -> None:
        return

    def drain(self) -> None:
        return


class BlockPath:
    """The worker's block transfers over one block IO. Fences, all kept here:
    - a save's blocks: the engine's stream waits until the blocks are read (GPU-side) before the
      next forward may overwrite them; the host goes on while the rows fill;
    - a load's blocks: the engine's stream waits until they are written before it reads them;
    - rows: the host reads or writes a row (UnitRows.read / store / copy_row) only after the
      transfers on it ended, and a deferred fn that reads a row runs before anything rewrites it.
    On CPU every fence is done at once, so deferred fns run at once, in call order."""

    def __init__(self, io, n_rows: int, layout: str):
        self.io = io
        rows = io.allocate_rows(n_rows)
        # Touch every page now: the OS maps host memory lazily, and a tier that fills with new units
        # would otherwise pay a page fault per page inside the step (3-4x the copy itself, measured).
        rows.buffer.zero_()
        self.rows = UnitRows(rows, layout, before_host=self._before_host)
        self._later: list[tuple[IOFence, tuple[int, ...] | None, Callable[[], None]]] = []

    def save(self, keys: Sequence[bytes], blocks: Sequence[int], rows: Sequence[int]) -> IOFence:
        if not rows:
            return IOFence()
        self.settle(rows)  # deferred puts read these rows' old bytes before the save replaces them
        fence = self.rows.store_blocks(keys, rows, self.io, blocks)
        fence.wait_blocks()
        return fence

    def save_staged(self, blocks: Sequence[int]) -> tuple[IOFence, BlockRows]:
        staging = self.io.allocate_rows(len(blocks))
        if not blocks:
            return IOFence(), staging
        fence = self.io.save(list(blocks), staging.buffer, range(len(blocks)))
        fence.wait_blocks()
        return fence, staging

    def load(self, rows: Sequence[int], blocks: Sequence[int]) -> None:
        if rows:
            self.rows.load_blocks(rows, self.io, blocks).wait_blocks()

    def load_payloads(self, payloads: Sequence[torch.Tensor], blocks: Sequence[int]) -> None:
        """Payloads: uint8 [row_bytes] each, as a tier returned them (the io reads them before it
        returns or keeps them alive until read)."""
        if payloads:
            self.io.load(torch.stack(list(payloads)), range(len(payloads)), list(blocks)).wait_blocks()

    def later(self, fence: IOFence, rows: Sequence[int] | None, fn: Callable[[], None]) -> None:
        """fn() once `fence`'s rows are filled; rows: the CPU rows fn reads (None: rows of its own)."""
        if fence.done():
            fn()
        else:
            self._later.append((fence, None if rows is None else tuple(rows), fn))

    def settle(self, rows: Sequence[int] | None = None) -> None:
        """Run the deferred fns (those reading `rows`, or all), waiting for their rows."""
        touched = None if rows is None else set(rows)
        due = [e for e in self._later if touched is None or (e[1] is not None and touched.intersection(e[1]))]
        self._run(due)

    def settle_done(self) -> None:
        self._run([e for e in self._later if e[0].done()])

    def _run(self, due) -> None:
        if not due:
            return
        gone = {id(e) for e in due}
        self._later = [e for e in self._later if id(e) not in gone]
        for fence, _, fn in due:
            fence.wait_rows()
            fn()

    def _before_host(self, rows: Sequence[int], write: bool) -> None:
        if write:
            self.settle(rows)
        self.io.wait_rows(rows)

    def drain(self) -> None:
        self.settle()
        self.io.drain()
