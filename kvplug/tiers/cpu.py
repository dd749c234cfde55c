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
