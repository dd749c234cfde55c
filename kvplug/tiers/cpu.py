"""The CPU tier's memory: rows of bytes, one row per unit (a KV block across all layers).

A row is contiguous, so it goes to disk as one buffer without packing. Each layer's part of
a row is viewed with that layer's block shape and dtype, so copies between the engine's paged
caches (any device, any strides) and rows are plain indexed tensor copies, whole blocks at a
time: the block interior is never interpreted (it may be ISA-packed on CPU backends).

    BlockRows.allocate(templates, n, pin)    n rows for blocks shaped like `templates`
    BlockRows(buffer, templates)             rows over an existing uint8 [n, row_bytes] buffer
    store(rows, caches, blocks)              caches[l][blocks] -> rows, every layer
    load(rows, caches, blocks)               rows -> caches[l][blocks], every layer
    row(i)                                   the bytes of row i (a view)
    layout_tag()                             shapes and dtypes, for file headers
UnitRows(block_rows, block_layout, before_host=None): which unit each row holds (blocks and
    chunks), and the only host access to a row's bytes; see the class.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Template = tuple[tuple[int, ...], torch.dtype]  # one layer's block: shape without the block dim


class BlockRows:
    def __init__(self, buffer: torch.Tensor, templates: Sequence[Template]):
        self.templates = list(templates)
        sizes = [math.prod(shape) * _itemsize(dtype) for shape, dtype in self.templates]
        self.row_bytes = sum(sizes)
        if buffer.dtype != torch.uint8 or buffer.dim() != 2 or buffer.shape[1] != self.row_bytes:
            raise ValueError(f"buffer {tuple(buffer.shape)} {buffer.dtype}: need uint8 [n, {self.row_bytes}]")
        self.buffer = buffer
        self.views: list[torch.Tensor] = []
        offset = 0
        for (shape, dtype), size in zip(self.templates, sizes):
            part = buffer[:, offset : offset + size]
            self.views.append(part.view(dtype).view(buffer.shape[0], *shape))
            offset += size

    @classmethod
    def allocate(cls, templates: Sequence[Template], n: int, pin: bool = False) -> "BlockRows":
        row_bytes = sum(math.prod(s) * _itemsize(d) for s, d in templates)
        buffer = torch.empty((n, row_bytes), dtype=torch.uint8, pin_memory=pin)
        return cls(buffer, templates)

    def __len__(self) -> int:
        return self.buffer.shape[0]

    def row(self, i: int) -> torch.Tensor:
        return self.buffer[i]

    def store(self, rows: Sequence[int], caches: Sequence[torch.Tensor], blocks: Sequence[int]) -> None:
        if not rows:
            return
        dev = caches[0].device
        src_idx = torch.tensor(blocks, dtype=torch.long, device=dev)
        dst_idx = torch.tensor(rows, dtype=torch.long)
        for view, cache in zip(self.views, caches, strict=True):
            view.index_copy_(0, dst_idx, cache.index_select(0, src_idx).to(view.device))

    def load(self, rows: Sequence[int], caches: Sequence[torch.Tensor], blocks: Sequence[int]) -> None:
        if not rows:
            return
        dev = caches[0].device
        src_idx = torch.tensor(rows, dtype=torch.long)
        dst_idx = torch.tensor(blocks, dtype=torch.long, device=dev)
        for view, cache in zip(self.views, caches, strict=True):
            cache.index_copy_(0, dst_idx, view.index_select(0, src_idx).to(dev, non_blocking=True))

    def layout_tag(self) -> str:
        return ";".join(f"{'x'.join(map(str, s))}:{str(d).removeprefix('torch.')}" for s, d in self.templates)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class UnitRows:
    """The CPU tier's rows and which unit each holds: a prefix block in one row, a chunk across
    as many rows as its payload needs (the scheduler's plan says which). A unit is readable only
    while every one of its rows still holds it, so a row reused by a later plan turns a stale
    read into a miss, never into another unit's bytes.

        holds(key, rows)                       every row still holds the unit
        read(key, rows) -> Unit | None         a copy of the unit's payload, with its layout
        copy_row(r) -> uint8 [row_bytes]       a copy of row r's bytes
        store(key, rows, payload, layout)      payload bytes into the rows
        store_blocks(keys, rows, io, blocks) / load_blocks(rows, io, blocks) -> IOFence   whole
                                               engine blocks to and from rows (one row each)
                                               through a block IO (kvplug/tiers/block_io.py)

    before_host(rows, write) runs before the host reads (write False) or writes a row's bytes:
    a block IO may still be filling or reading them on a side stream.
    """

    def __init__(self, blocks: BlockRows, block_layout: str, before_host=None):
        self.blocks, self.block_layout = blocks, block_layout
        self._before_host = before_host or (lambda rows, write: None)
        self.row_bytes = blocks.row_bytes
        self._keys: list[bytes | None] = [None] * len(blocks)
        self._units: dict[bytes, tuple[tuple[int, ...], str, int]] = {}  # key -> (rows, layout, nbytes)

    def __len__(self) -> int:
        return len(self.blocks)

    def holds(self, key: bytes, rows: Sequence[int]) -> bool:
        unit = self._units.get(key)
        return unit is not None and unit[0] == tuple(rows) and all(self._keys[r] == key for r in rows)

    def read(self, key: bytes, rows: Sequence[int]):
        from kvplug.tiers.tier import Unit

        if not rows or not self.holds(key, rows):
            return None
        _, layout, nbytes = self._units[key]
        self._before_host(rows, False)
        idx = torch.tensor(list(rows), dtype=torch.long)
        return Unit(key, self.blocks.buffer.index_select(0, idx).view(-1)[:nbytes].clone(), layout)

    def store(self, key: bytes, rows: Sequence[int], payload: torch.Tensor, layout: str) -> None:
        rows = tuple(rows)
        if payload.numel() > len(rows) * self.row_bytes:
            raise ValueError(f"a {payload.numel()}-byte unit does not fit {len(rows)} row(s) of {self.row_bytes} bytes")
        self._before_host(rows, True)
        self._claim(key, rows, layout, payload.numel())
        flat = payload.reshape(-1)
        for i, r in enumerate(rows):
            part = flat[i * self.row_bytes:(i + 1) * self.row_bytes]
            self.blocks.buffer[r, :part.numel()].copy_(part)

    def copy_row(self, r: int) -> torch.Tensor:
        self._before_host((r,), False)
        return self.blocks.row(r).clone()

    def store_blocks(self, keys: Sequence[bytes], rows: Sequence[int], io, blocks: Sequence[int]):
        """The blocks saved into the rows by `io` (its fence returned); the rows hold the keys
        from now on: a host read of them waits for the fence (before_host)."""
        fence = io.save(list(blocks), self.blocks.buffer, list(rows))
        for key, r in zip(keys, rows, strict=True):
            self._claim(key, (r,), self.block_layout, self.row_bytes)
        return fence

    def load_blocks(self, rows: Sequence[int], io, blocks: Sequence[int]):
        return io.load(self.blocks.buffer, list(rows), list(blocks))

    def forget(self, rows: Sequence[int]) -> None:
        for r in rows:
            key, self._keys[r] = self._keys[r], None
            if key is not None:
                self._units.pop(key, None)

    def _claim(self, key: bytes, rows: tuple[int, ...], layout: str, nbytes: int) -> None:
        self.forget(rows)  # whatever these rows held is gone as a whole
        old = self._units.get(key)
        if old is not None:
            self.forget(old[0])
        for r in rows:
            self._keys[r] = key
        self._units[key] = (rows, layout, nbytes)
