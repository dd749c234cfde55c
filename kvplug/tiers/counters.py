"""Thread-safe counters for a store whose writer thread and callers both count.

Subclass as a @dataclass with int fields:
    add(**deltas)     add to fields, under the lock
    take()            a copy of the counts since the previous take(), which are reset to zero
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class Counters:
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False, kw_only=True)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)

    def take(self):
        with self._lock:
            names = [f.name for f in fields(self) if not f.name.startswith("_")]
            snap = type(self)(**{n: getattr(self, n) for n in names})
            for n in names:
                setattr(self, n, 0)
        return snap
