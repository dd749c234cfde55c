"""AsyncWriter: ops carried out in queue order, queued ops visible to reads, a byte cap, a bug survived."""
import threading

import pytest
import torch

from kvplug.tiers.writer import DELETE, PUT, AsyncWriter


def payload(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """carry_out that waits for `gate` and records what it was asked to do."""

    def __init__(self):
        self.gate, self.done, self.bugs = threading.Event(), [], 0

    def __call__(self, kind, key, tensor, arg):
        self.gate.wait(timeout=30)
        if key == b"boom":
            raise RuntimeError("a bug in carry_out")
        self.done.append((kind, key, None if tensor is None else int(tensor.sum()), arg))

    def bug(self):
        self.bugs += 1


def test_order_read_your_writes_and_cap():
    rec = Recorder()
    w = AsyncWriter("test-writer", rec, max_pending_bytes=250, on_bug=rec.bug)
    a, b = payload(100, 1), payload(100, 2)
    assert w.put(b"a", a, arg=7) and w.put(b"b", b)
    assert not w.put(b"c", payload(100, 3))  # 300 > 250 bytes queued: dropped, not queued
    w.delete(b"a")
    assert w.pending(b"a") == (True, None)  # the newest op on a key is what reads see
    assert w.pending(b"b")[1] is b and w.pending(b"c") == (False, None)
    rec.gate.set()
    w.flush()
    assert rec.done == [(PUT, b"a", int(a.sum()), 7), (PUT, b"b", int(b.sum()), None), (DELETE, b"a", None, None)]
    assert w.pending(b"a") == (False, None) and w.pending(b"b") == (False, None)
    assert w.put(b"c", payload(200, 4))  # the queued bytes were released
    w.close()
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.delete(b"c")


def test_a_bug_in_carry_out_is_reported_and_survived():
    rec = Recorder()
    rec.gate.set()
    w = AsyncWriter("test-writer", rec, max_pending_bytes=1 << 20, on_bug=rec.bug)
    w.put(b"boom", payload(10, 5))
    w.put(b"after", payload(10, 6))
    w.flush()  # returns: the thread lived on
    assert rec.bugs == 1 and [d[1] for d in rec.done] == [b"after"]
    assert w.pending(b"boom") == (False, None)
    w.close()
