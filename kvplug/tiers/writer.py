"""The asynchronous writer of a store (disk files, remote values): one thread carries out queued puts and
deletes in the order they were queued, so the engine's step never waits for I/O.

Reads see queued ops (read your writes): pending(key) is the newest op not yet carried out. Queued
payloads are held by reference and count against max_pending_bytes; past it, put() drops the unit
(a cache may always forget) instead of letting memory grow without bound.

AsyncWriter(name, carry_out, max_pending_bytes, on_bug)
    put(key, tensor, arg=None) -> bool   queue carry_out(PUT, key, tensor, arg); False if dropped (full)
    delete(key, arg=None)                queue carry_out(DELETE, key, None, arg)
    pending(key) -> (queued, tensor)     (True, tensor) for a queued put, (True, None) for a queued delete
    pending_with_arg(key) -> (queued, tensor, arg)   the same, with the op's arg
    flush()                              block until every queued op is carried out
    close()                              carry out what is queued, then stop the thread
carry_out must not raise for I/O trouble (count it, back off); an exception from it is a bug, which is
logged, reported to on_bug() and survived: a dead writer would make flush() wait forever.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger("kvplug")

PUT, DELETE = "put", "delete"


class AsyncWriter:
    def __init__(self, name: str, carry_out: Callable[[str, bytes, torch.Tensor | None, object], None],
                 max_pending_bytes: int, on_bug: Callable[[], None]):
        self.name, self.max_pending_bytes = name, max_pending_bytes
        self._carry_out, self._on_bug = carry_out, on_bug
        # Invariant: _inflight[key] is the newest queued-but-unfinished op on key, as (seq, tensor, arg)
        # for a put or (seq, None, arg) for a delete; the thread removes it only if seq still matches.
        self._inflight: dict[bytes, tuple[int, torch.Tensor | None, object]] = {}
        self._pending_bytes = 0
        self._seq = 0
        self._closed = False
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, key: bytes, tensor: torch.Tensor, arg: object = None) -> bool:
        with self._lock:
            self._check_open()
            if self._pending_bytes > 0 and self._pending_bytes + tensor.nbytes > self.max_pending_bytes:
                return False
            self._pending_bytes += tensor.nbytes
            self._enqueue(PUT, key, tensor, arg)
        return True

    def delete(self, key: bytes, arg: object = None) -> None:
        with self._lock:
            self._check_open()
            self._enqueue(DELETE, key, None, arg)

    def pending(self, key: bytes) -> tuple[bool, torch.Tensor | None]:
        queued, tensor, _ = self.pending_with_arg(key)
        return queued, tensor

    def pending_with_arg(self, key: bytes) -> tuple[bool, torch.Tensor | None, object]:
        with self._lock:
            entry = self._inflight.get(key)
        return (False, None, None) if entry is None else (True, entry[1], entry[2])

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # FIFO: every op queued before it is still carried out
        self._thread.join()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")

    def _enqueue(self, kind: str, key: bytes, tensor: torch.Tensor | None, arg: object) -> None:
        # Under self._lock, so queue order and _inflight agree.
        self._seq += 1
        self._inflight[key] = (self._seq, tensor, arg)
        self._queue.put((kind, key, tensor, arg, self._seq))

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            try:
                if op is None:
                    return
                kind, key, tensor, arg, seq = op
                try:
                    self._carry_out(kind, key, tensor, arg)
                finally:
                    self._release(key, seq, tensor)
            except Exception:
                self._on_bug()
                logger.exception("kvplug: unexpected error in %s", self.name)
            finally:
                self._queue.task_done()

    def _release(self, key: bytes, seq: int, tensor: torch.Tensor | None) -> None:
        with self._lock:
            entry = self._inflight.get(key)
            if entry is not None and entry[0] == seq:
                del self._inflight[key]
            if tensor is not None:
                self._pending_bytes -= tensor.nbytes
