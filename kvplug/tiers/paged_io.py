"""Whole blocks between vLLM's paged GPU caches and host rows, every layer in one kernel launch.

The GPU path of the worker's block loads and saves (the CPU path keeps BlockRows' opaque
copies: a CPU backend's block interior may be ISA-packed). A row holds one block of every layer
in kvplug's canonical token layout [L, 2, T, H, D] (T = tokens per block, 0 = K, 1 = V), not
the engine's bytes, so its layout tag (canonical_layout_tag) differs from any BlockRows tag and
the tiers never hand a unit saved by one path to the other. The same row loads into any of
vLLM's cache layouts (LBNHC, LBHNC, block-outer, padded pages).

On CUDA, each call runs on side streams after the work already queued on the caller's stream
(the forward that wrote the blocks), and returns an IOFence at once:
    save: gather_chunks of the blocks' slots -> device staging -> [n, L, 2, T, H, D] -> host rows
          (pinned rows: async copies, one per run of consecutive row ids; pageable rows: through
          pinned staging, and the call returns once they are filled)
    load: host rows -> device staging -> scatter_chunks into the blocks
Before the caller's stream writes a block that a save read (the next forward), it waits for the
fence's block side (fence.wait_blocks() or io.wait_blocks(): a GPU-side wait, the host goes on).
On CPU the same calls run the torch backend over the same views and return a finished fence.

    PagedBlockIO(views, block_tokens=None, backend="auto")  over (k, v) [nb, bs, H, D] view pairs
    PagedBlockIO.from_vllm(caches, layout=None, block_tokens=None)   vLLM 0.32 [B, H, N, 2D] caches
    .layout_tag / .row_bytes / .templates / .block_tokens   what a row is
    .allocate_rows(n, pin=None) -> BlockRows     rows of this layout (pinned by default on CUDA)
    .save(blocks, rows, row_ids) -> IOFence      blocks -> rows (rows: uint8 [n_rows, row_bytes])
    .load(rows, row_ids, blocks) -> IOFence      rows -> blocks (distinct blocks)
    .wait_blocks(stream=None)   that stream waits for the block side of every pending call
    .wait_rows(row_ids)         the host waits for the last call that read or wrote those rows
                                (before the host reads a saved row or overwrites a row in use)
    .drain()                    the host waits for every pending call
IOFence:
    wait_blocks(stream=None)    the stream (default: current) waits until the blocks were read
                                (save: they may be reused) or written (load: they may be read)
    wait_rows()                 the host waits until the rows were written (save) or read (load)
    synchronize() / done()      both sides on the host / whether both are finished
    canonical_layout_tag(L, T, H, D, dtype) / is_canonical_tag(tag)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvplug.ops.gather_scatter import gather_chunks, scatter_chunks
from kvplug.ops.kv_layout import paged_spec, vllm_kv_views
from kvplug.tiers.cpu import BlockRows

TAG_PREFIX = "kv-tokens-v1"
_MAX_ROW_EVENTS = 1 << 16  # past this many rows tracked, finished ones are forgotten


def canonical_layout_tag(num_layers: int, block_tokens: int, num_heads: int, head_dim: int,
                         dtype: torch.dtype) -> str:
    """Layout tag of a row: canonical [L, 2, T, H, D] in `dtype`. A BlockRows tag is a list of
    per-layer engine block shapes and never starts with TAG_PREFIX."""
    dt = str(dtype).removeprefix("torch.")
    return f"{TAG_PREFIX}[L,2,T,H,D]={num_layers}x2x{block_tokens}x{num_heads}x{head_dim}:{dt}"


def is_canonical_tag(tag: str) -> bool:
    return tag.startswith(TAG_PREFIX + "[")


class IOFence:
    """Completion of one save or load; see the module docstring. A CPU call's fence is done."""

    def __init__(self, blocks_event=None, rows_event=None, device=None, keep=()):
        self._blocks, self._rows, self._device = blocks_event, rows_event, device
        self._keep = keep  # host staging lives until the copies that read or fill it end

    def wait_blocks(self, stream=None) -> None:
        if self._blocks is not None:
            (stream or torch.cuda.current_stream(self._device)).wait_event(self._blocks)

    def wait_rows(self) -> None:
        if self._rows is not None:
            self._rows.synchronize()

    def synchronize(self) -> None:
        for event in (self._blocks, self._rows):
            if event is not None:
                event.synchronize()
        self._keep = ()

    def done(self) -> bool:
        return all(e is None or e.query() for e in (self._blocks, self._rows))


class PagedBlockIO:
    def __init__(self, views: Sequence[tuple[torch.Tensor, torch.Tensor]], block_tokens: int | None = None,
                 backend: str = "auto"):
        self.views = [tuple(p) for p in views]
        self.spec = s = paged_spec([k for k, _ in self.views], [v for _, v in self.views])
        self.block_tokens = block_tokens or s.block_size
        if self.block_tokens % s.block_size or s.num_slots % self.block_tokens:
            raise ValueError(f"block_tokens={self.block_tokens}: must be a multiple of the kernel block size "
                             f"{s.block_size} dividing the cache's {s.num_slots} slots")
        self.num_blocks = s.num_slots // self.block_tokens
        self.backend = backend
        self.row_shape = (s.num_layers, 2, self.block_tokens, s.num_heads, s.head_dim)
        self.templates = [(self.row_shape, s.dtype)]
        self.row_bytes = BlockRows.allocate(self.templates, 0).row_bytes
        self.layout_tag = canonical_layout_tag(s.num_layers, self.block_tokens, s.num_heads, s.head_dim, s.dtype)
        self._cuda = s.device.type == "cuda"
        names = ("gather", "d2h", "load") if self._cuda else ()
        self._streams = {n: torch.cuda.Stream(s.device) for n in names}
        self._row_events: dict = {}  # row id -> event of the last call that read or wrote it
        self._pending: list[IOFence] = []

    @classmethod
    def from_vllm(cls, caches: Sequence[torch.Tensor], layout: str | None = None, block_tokens: int | None = None,
                  backend: str = "auto") -> "PagedBlockIO":
        """Over vLLM 0.32's registered per-layer caches (kernel blocks); block_tokens: vLLM's
        block size when it splits blocks into smaller kernel blocks."""
        return cls([vllm_kv_views(c, layout) for c in caches], block_tokens, backend)

    def allocate_rows(self, n: int, pin: bool | None = None) -> BlockRows:
        return BlockRows.allocate(self.templates, n, pin=self._cuda if pin is None else pin)

    # ---- checks -------------------------------------------------------------------------
    def _ids(self, ids, limit: int, name: str, distinct: bool) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
            raise ValueError(f"{name} {t[(t < 0) | (t >= limit)][:4].tolist()}...: each must be in [0, {limit})")
        if distinct and t.unique().numel() != t.numel():
            raise ValueError(f"{name} of shape {tuple(t.shape)} repeat an id: each must appear once")
        return t

    def _rows_view(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != self.row_bytes or rows.is_cuda \
                or not rows.is_contiguous():
            raise ValueError(f"rows of shape {tuple(rows.shape)} {rows.dtype} on {rows.device}: expected contiguous "
                             f"host uint8 [n, {self.row_bytes}] (layout {self.layout_tag})")
        return rows.view(self.spec.dtype).view(rows.shape[0], *self.row_shape)

    def _args(self, blocks, rows, row_ids, load: bool):
        view = self._rows_view(rows)
        b = self._ids(blocks, self.num_blocks, "blocks", distinct=load)
        r = self._ids(row_ids, rows.shape[0], "row_ids", distinct=not load)
        if b.numel() != r.numel():
            raise ValueError(f"blocks of shape {tuple(b.shape)} and row_ids of shape {tuple(r.shape)}: one row per block")
        return view, b, r

    def _slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """Every token slot of the blocks, block by block: the gather order of the rows."""
        t = self.block_tokens
        return (blocks[:, None] * t + torch.arange(t)).flatten()

    # ---- calls --------------------------------------------------------------------------
    def save(self, blocks, rows: torch.Tensor, row_ids) -> IOFence:
        view, b, r = self._args(blocks, rows, row_ids, load=False)
        if b.numel() == 0:
            return IOFence()
        if self._cuda:
            return self._track(self._save_cuda(view, b, r))
        chunk = gather_chunks(self.views, self._slots(b), backend=self.backend)
        view.index_copy_(0, r, self._per_block(chunk, b.numel()))
        return IOFence()

    def load(self, rows: torch.Tensor, row_ids, blocks) -> IOFence:
        view, b, r = self._args(blocks, rows, row_ids, load=True)
        if b.numel() == 0:
            return IOFence()
        if self._cuda:
            return self._track(self._load_cuda(view, r, b))
        scatter_chunks(self._per_layer(view.index_select(0, r)), self.views, self._slots(b), backend=self.backend)
        return IOFence()

    def _per_block(self, chunk: torch.Tensor, n: int) -> torch.Tensor:
        """[L, 2, n*T, H, D] -> [n, L, 2, T, H, D] (a view)."""
        L, _, _, H, D = chunk.shape
        return chunk.view(L, 2, n, self.block_tokens, H, D).permute(2, 0, 1, 3, 4, 5)

    def _per_layer(self, staged: torch.Tensor) -> torch.Tensor:
        """[n, L, 2, T, H, D] -> contiguous [L, 2, n*T, H, D], the kernels' chunk layout."""
        n, L, _, T, H, D = staged.shape
        return staged.permute(1, 2, 0, 3, 4, 5).reshape(L, 2, n * T, H, D)

    # ---- CUDA ---------------------------------------------------------------------------
    # Three streams: saves gather on one and copy to the host on another, so a save's blocks
    # are released (blocks event) without waiting for the previous save's PCIe copies; loads
    # have their own, so a load never queues behind saves. Rows are shared between them: each
    # call waits for the last call that touched its rows (a load of a row being saved, a save
    # into a row being loaded) and then becomes that row's last call.
    def _begin(self, stream, b: torch.Tensor):
        """`stream` after the caller's queued work (the forward that wrote the blocks); the slots
        on the device (copied on `stream`)."""
        stream.wait_stream(torch.cuda.current_stream(self.spec.device))
        host_slots = self._slots(b).pin_memory()
        with torch.cuda.stream(stream):
            return host_slots, host_slots.to(self.spec.device, non_blocking=True)

    def _after_rows(self, stream, rows: torch.Tensor) -> None:
        for event in {id(e): e for e in (self._row_events.get(r) for r in rows.tolist()) if e is not None}.values():
            stream.wait_event(event)  # a GPU-side wait: the host goes on

    def _mark_rows(self, rows: torch.Tensor, event) -> None:
        if len(self._row_events) > _MAX_ROW_EVENTS:
            self._row_events = {r: e for r, e in self._row_events.items() if not e.query()}
        self._row_events.update(dict.fromkeys(rows.tolist(), event))

    def _save_cuda(self, view: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> IOFence:
        gather, copy = self._streams["gather"], self._streams["d2h"]
        host_slots, slots = self._begin(gather, b)
        with torch.cuda.stream(gather):
            chunk = gather_chunks(self.views, slots, backend=self.backend)
            blocks_done = _record(gather)  # the blocks are read: the caller may overwrite them
            staged = self._per_block(chunk, b.numel()).contiguous()
            staged_ready = _record(gather)
        pinned = view.is_pinned()
        dst = view if pinned else torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
        self._after_rows(copy, r)
        copy.wait_event(staged_ready)
        with torch.cuda.stream(copy):
            for row, first, count in _runs(r if pinned else torch.arange(b.numel())):
                dst[row:row + count].copy_(staged[first:first + count], non_blocking=True)
            rows_done = _record(copy)
        staged.record_stream(copy)  # made on the gather stream, read on the copy stream
        if not pinned:  # pageable rows: filled here, on the host (pinned rows are the fast path)
            rows_done.synchronize()
            view.index_copy_(0, r, dst)
        self._mark_rows(r, rows_done)
        return IOFence(blocks_done, rows_done, self.spec.device, (host_slots, dst))

    def _load_cuda(self, view: torch.Tensor, r: torch.Tensor, b: torch.Tensor) -> IOFence:
        stream = self._streams["load"]
        host_slots, slots = self._begin(stream, b)
        self._after_rows(stream, r)
        pinned = view.is_pinned()
        src = view if pinned else view.index_select(0, r).pin_memory()  # pageable: read here, once
        with torch.cuda.stream(stream):
            staged = torch.empty((b.numel(), *self.row_shape), dtype=self.spec.dtype, device=self.spec.device)
            for first, row, count in _runs(r if pinned else torch.arange(b.numel()), src_runs=True):
                staged[first:first + count].copy_(src[row:row + count], non_blocking=True)
            rows_done = _record(stream)
            scatter_chunks(self._per_layer(staged), self.views, slots, backend=self.backend)
            blocks_done = _record(stream)
        self._mark_rows(r, rows_done)
        return IOFence(blocks_done, rows_done, self.spec.device, (host_slots, src))

    def _track(self, fence: IOFence) -> IOFence:
        self._pending = [f for f in self._pending if not f.done()] + [fence]
        return fence

    def wait_blocks(self, stream=None) -> None:
        for f in self._pending:
            f.wait_blocks(stream)

    def wait_rows(self, row_ids) -> None:
        for event in {id(e): e for e in (self._row_events.get(int(r)) for r in row_ids) if e is not None}.values():
            event.synchronize()

    def drain(self) -> None:
        for f in self._pending:
            f.synchronize()
        self._pending = []


def _record(stream) -> "torch.cuda.Event":
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _runs(ids: torch.Tensor, src_runs: bool = False):
    """(row, first, count) for each run of consecutive ids (ids[first + i] = row + i); with
    src_runs, (first, row, count). One copy per run: rows saved together are usually adjacent."""
    ids = ids.tolist()
    first = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            yield (first, ids[first], i - first) if src_runs else (ids[first], first, i - first)
            first = i
