"""The storage interface every tier implements, and the registry that names the tiers.

A unit is what a tier stores under a 32-byte key: a KV prefix block across all layers (opaque
engine bytes), a blend chunk's KV (canonical layout), or an SGLang page. Its payload is a
contiguous CPU uint8 tensor; its layout tag says how those bytes are to be read, travels with
the unit (file header, remote value) and is checked on every read: a unit of another layout,
model or dtype is a miss, never bytes reinterpreted.

Tier methods (the disk and remote stores implement them; kvplug's CPU tier is addressed by the
scheduler's slots instead, see kvplug/tiers/manager.py):
    lookup(keys) -> list[bool]                 held or not, per key; one round trip, no side effects
    get_many(keys, layout=None) -> list[Tensor | None]   payloads; a miss, a bad or foreign unit is
                                               None (bad units are removed and counted)
    put_many(units)                            queue writes of Unit(key, payload, layout, ttl_s);
                                               returns at once (a background writer carries them out)
    delete_many(keys)                          queue deletes, ordered after earlier writes
    take_stats()                               counters since the previous call, as a dict
    flush() / close()                          wait for queued writes / stop the writer

Registry:
    register_tier(name)      class decorator: the tier is built by make_tier(name, ...)
    make_tier(name, **kw)    build one; ValueError naming the registered names otherwise
    TIERS                    name -> class
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

TIERS: dict[str, type] = {}


@dataclass(frozen=True)
class Unit:
    key: bytes
    payload: torch.Tensor  # contiguous CPU uint8; the tier keeps it by reference until written
    layout: str | None = None  # None: the tier's own default layout
    ttl_s: float | None = None  # the unit's expiry where the tier has one (remote); None: its default


class Tier(Protocol):
    name: str

    def lookup(self, keys: Sequence[bytes]) -> list[bool]: ...

    def get_many(self, keys: Sequence[bytes], layout: str | None = None) -> list[torch.Tensor | None]: ...

    def put_many(self, units: Sequence[Unit]) -> None: ...

    def delete_many(self, keys: Sequence[bytes]) -> None: ...

    def take_stats(self) -> dict[str, int]: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def register_tier(name: str):
    def add(cls):
        if name in TIERS and TIERS[name] is not cls:
            raise ValueError(f"tier {name!r} is already registered by {TIERS[name].__name__}")
        cls.name = name
        TIERS[name] = cls
        return cls
    return add


def make_tier(name: str, **kwargs) -> Tier:
    _load_builtin()
    cls = TIERS.get(name)
    if cls is None:
        raise ValueError(f"tier {name!r}: registered tiers are {', '.join(sorted(TIERS))}")
    return cls(**kwargs)


def _load_builtin() -> None:
    # The stores register themselves on import; redis is imported only when a remote tier is used.
    import kvplug.tiers.disk  # noqa: F401
    if "remote" not in TIERS:
        try:
            import kvplug.tiers.remote  # noqa: F401
        except ImportError:  # no redis-py: the remote tier is simply not registered
            pass
