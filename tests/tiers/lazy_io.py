"""LazyBlockIO: PagedBlockIO on CPU tensors whose transfers happen late, as on a GPU's side streams.

Each save is two steps (read the blocks, fill the rows), each load two (read the rows, write the
blocks). Steps run in issue order, and only when something waits for them: the host
(wait_rows, a fence's wait_rows / synchronize, drain) at once; the engine's stream (wait_blocks)
only at forward(), which stands for the next forward pass. So code that reads or writes a row
before waiting for it, or lets the engine reuse a block a save has not read yet, sees wrong bytes
here, where PagedBlockIO's CPU path (every fence done at once) would hide it.

    LazyBlockIO(caches, block_tokens=None)   over vLLM-layout caches [B, H, N, 2D]
    .forward()        run what the engine's stream waits for (then the test plays the forward)
    .pending()        steps not run yet
"""
from __future__ import annotations

from kvplug.ops.gather_scatter import gather_chunks, scatter_chunks
from kvplug.ops.kv_layout import vllm_kv_views
from kvplug.tiers.paged_io import IOFence, PagedBlockIO


class LazyFence(IOFence):
    def __init__(self, io: "LazyBlockIO", blocks_step: int, rows_step: int):
        super().__init__()
        self.io, self.blocks_step, self.rows_step = io, blocks_step, rows_step

    def wait_blocks(self, stream=None) -> None:
        self.io.engine_waits(self.blocks_step)

    def wait_rows(self) -> None:
        self.io.run_to(self.rows_step)

    def synchronize(self) -> None:
        self.io.run_to(max(self.blocks_step, self.rows_step))

    def done(self) -> bool:
        return self.io.ran > max(self.blocks_step, self.rows_step)


class LazyBlockIO(PagedBlockIO):
    def __init__(self, caches, block_tokens=None):
        super().__init__([vllm_kv_views(c) for c in caches], block_tokens, backend="torch")
        self.steps: list = []  # (fn, rows it touches)
        self.ran = 0  # steps[:ran] have run
        self.engine_mark = 0  # the engine's stream waits for steps[:engine_mark]

    def save(self, blocks, rows, row_ids) -> IOFence:
        view, b, r = self._args(blocks, rows, row_ids, load=False)
        if b.numel() == 0:
            return IOFence()
        box = {}

        def read_blocks():
            box["chunk"] = gather_chunks(self.views, self._slots(b), backend="torch")

        def fill_rows():
            view.index_copy_(0, r, self._per_block(box["chunk"], b.numel()))
        return LazyFence(self, self._step(read_blocks, ()), self._step(fill_rows, r.tolist()))

    def load(self, rows, row_ids, blocks) -> IOFence:
        view, b, r = self._args(blocks, rows, row_ids, load=True)
        if b.numel() == 0:
            return IOFence()
        box = {}

        def read_rows():
            box["staged"] = view.index_select(0, r)

        def write_blocks():
            scatter_chunks(self._per_layer(box["staged"]), self.views, self._slots(b), backend="torch")
        rows_step = self._step(read_rows, r.tolist())
        return LazyFence(self, self._step(write_blocks, ()), rows_step)

    def _step(self, fn, rows) -> int:
        self.steps.append((fn, set(rows)))
        return len(self.steps) - 1

    def run_to(self, i: int) -> None:
        while self.ran <= i:
            fn, _ = self.steps[self.ran]
            self.ran += 1
            fn()

    def engine_waits(self, i: int) -> None:
        self.engine_mark = max(self.engine_mark, i + 1)

    def forward(self) -> None:
        self.run_to(self.engine_mark - 1)

    def pending(self) -> int:
        return len(self.steps) - self.ran

    def wait_blocks(self, stream=None) -> None:
        self.engine_waits(len(self.steps) - 1)

    def wait_rows(self, row_ids) -> None:
        ids = {int(x) for x in row_ids}
        self.run_to(max((i for i, (_, rows) in enumerate(self.steps) if rows & ids), default=-1))

    def drain(self) -> None:
        self.run_to(len(self.steps) - 1)
