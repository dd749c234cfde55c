"""The tier interface: what a storage tier is to kvplug, and the registry that names the tiers.

A unit is what a tier stores under a 32-byte key: a KV prefix block across all layers (opaque
engine bytes), a blend chunk's KV (canonical layout), or an SGLang page. Its payload is a
contiguous CPU uint8 tensor; its layout tag says how those bytes are to be read, travels with
the unit (file header, remote value) and is checked on every read: a unit of another layout,
model or dtype is a miss, never bytes reinterpreted. kvplug's own CPU rows (named "cpu") are
addressed by the scheduler's slots and are not a spec; every other tier is one.

A tier kind is a TierSpec subclass registered by name. As vLLM's OffloadingSpec does, a spec
built from the configuration gives two halves:
    scheduler side   spec.index(tp_size) -> TierIndexView: which units the tier holds, answered
                     from memory (no system call in the scheduler's loop; a shared remote store
                     is asked in one batched round trip), kept current by what the scheduler
                     plans and by what the worker reports (units it could not write or read)
    worker side      spec.store(layout, rank) -> Tier: batched reads and writes of units

TierSpec (class attributes, then methods):
    name                     the registry name: metadata, counters (<name>_<counter>) and logs use it
    loads_async              reads may take long: loads from it run in the background (async_loads)
    COUNTERS                 {counter: meaning} the tier reports, as <name>_<counter>
    capacity_bytes           bytes kvplug keeps in it, evicted by the eviction policy (None: the
                             store manages its own capacity and expiry)
    codec                    the KV codec its units are stored under ("none", "int8", "int4":
                             kvplug/tiers/codec.py); the worker hands store() the UnitCodec for it
    write_through            every save goes to it (False: only units the CPU tier evicts)
    unit_overhead            bytes a unit costs in it per rank beyond its payload (a file header)
    from_config(tiers, options) -> spec | None   None: not configured; ValueError naming a bad option
    index(tp_size) -> TierIndexView
    store(layout, rank[, codec]) -> Tier   (codec, a UnitCodec, is passed only when codec is not "none")
    restore(store, layouts) -> Restored   (worker side, start-up) the units of those layouts it holds
    counters(store_stats) -> dict         its store's take_stats() as its reported counters

Tier (the worker-side store; every method is safe to call from the worker's threads):
    lookup(keys) -> list[bool]                 held or not, per key; one round trip, no side effects
    get_many(keys, layout=None) -> list[Tensor | None]   payloads; a miss, a bad or foreign unit is
                                               None (bad units are removed and counted)
    put_many(units)                            queue writes of Unit(key, payload, layout, ttl_s);
                                               returns at once (a background writer carries them out)
    delete_many(keys)                          queue deletes, ordered after earlier writes
    take_lost() -> list[bytes]                 keys it no longer holds although asked to (a write
                                               failed or was dropped, a unit found bad) since the last call
    take_stats() -> dict                       counters since the previous call
    flush() / close()                          wait for queued writes / stop the writer

TierIndexView (scheduler side; HeldUnits is the in-memory one local tiers use):
    contains_many(keys) -> list[bool]          per key, held or not; no side effects
    noted(key, held)                           the scheduler planned a write (True) or a delete (False)
    lost(keys)                                 the worker reported these gone
    restored(keys)                             units the workers found at start-up
    close()

Registry (a built-in tier is one line in BUILTIN, imported on first use; any other module
registers its spec with the decorator when it is imported):
    register_tier(name)        class decorator
    tier_names()               every name, built-in first, without importing anything
    tier_class(name)           the spec class; ValueError naming the registered tiers otherwise
    configured_tiers(tiers)    the specs a TierConfig turns on, in lookup order
"""
from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # torch is heavy: the command line lists tier names without it
    import torch

    from kvplug.config import TierConfig

CPU = "cpu"  # kvplug's own rows; no spec may take the name
# name -> "module:class", imported the first time the tier is used.
BUILTIN = {"disk": "kvplug.tiers.disk_tier:DiskTier", "remote": "kvplug.tiers.remote_tier:RemoteTier"}
_CLASSES: dict[str, type["TierSpec"]] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Unit:
    key: bytes
    payload: "torch.Tensor"  # contiguous CPU uint8; the tier keeps it by reference until written
    layout: str | None = None  # None: the tier's own default layout
    ttl_s: float | None = None  # the unit's expiry where the tier has one (remote); None: its default


@dataclass
class Restored:
    """What a worker found in a tier at start-up: units of its layouts (oldest first) and the
    bad files it removed on the way."""
    keys: list[bytes] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)  # stored bytes of each (this rank)
    mtimes: list[float] = field(default_factory=list)
    corrupt: int = 0


class Tier(Protocol):
    def lookup(self, keys: Sequence[bytes]) -> list[bool]: ...

    def get_many(self, keys: Sequence[bytes], layout: str | None = None) -> list["torch.Tensor | None"]: ...

    def put_many(self, units: Sequence[Unit]) -> None: ...

    def delete_many(self, keys: Sequence[bytes]) -> None: ...

    def take_lost(self) -> list[bytes]: ...

    def take_stats(self) -> dict[str, int]: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TierIndexView(Protocol):
    def contains_many(self, keys: Sequence[bytes]) -> list[bool]: ...

    def noted(self, key: bytes, held: bool) -> None: ...

    def lost(self, keys: Sequence[bytes]) -> None: ...

    def restored(self, keys: Sequence[bytes]) -> None: ...

    def close(self) -> None: ...


class HeldUnits:
    """The scheduler's view of a tier only this engine's plans change: the units planned into
    it, less those deleted or reported lost. Thread-safe (a subclass may feed it from a thread)."""

    def __init__(self):
        self._held: set[bytes] = set()
        self._lock = threading.Lock()

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._held for k in keys]

    def noted(self, key: bytes, held: bool) -> None:
        with self._lock:
            (self._held.add if held else self._held.discard)(key)

    def lost(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            self._held.difference_update(keys)

    def restored(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            self._held.update(keys)

    def close(self) -> None:
        return


class TierSpec:
    """One configured tier; see the module docstring. Subclasses set the class attributes and
    implement from_config, index and store."""
    name: ClassVar[str] = ""
    loads_async: ClassVar[bool] = True
    COUNTERS: ClassVar[dict[str, str]] = {}
    capacity_bytes: int | None = None
    write_through: bool = True
    unit_overhead: int = 0
    codec: str = "none"

    @classmethod
    def from_config(cls, tiers: "TierConfig", options: Mapping[str, Any] | None) -> "TierSpec | None":
        raise NotImplementedError

    def index(self, tp_size: int) -> TierIndexView:
        raise NotImplementedError

    def store(self, layout: str, rank: int, codec=None) -> Tier:
        raise NotImplementedError

    def restore(self, store: Tier, layouts: Sequence[str]) -> Restored:
        return Restored()

    def counters(self, store_stats: Mapping[str, int]) -> dict[str, int]:
        return {k: v for k, v in store_stats.items() if k in self.COUNTERS}


def register_tier(name: str):
    def add(cls):
        if name == CPU or not name.isidentifier():
            raise ValueError(f"tier name {name!r}: must be an identifier other than {CPU!r}")
        with _LOCK:
            if name in _CLASSES and _CLASSES[name] is not cls:
                raise ValueError(f"tier {name!r} is already registered by {_CLASSES[name].__name__}")
            cls.name = name
            _CLASSES[name] = cls
        return cls
    return add


def tier_names() -> tuple[str, ...]:
    return tuple(BUILTIN) + tuple(n for n in _CLASSES if n not in BUILTIN)


def tier_class(name: str) -> type[TierSpec]:
    if name not in _CLASSES and name in BUILTIN:
        module, cls = BUILTIN[name].split(":")
        importlib.import_module(module)  # registers itself
        if _CLASSES.get(name).__name__ != cls:
            raise ValueError(f"tier {name!r}: {BUILTIN[name]} did not register it")
    if name not in _CLASSES:
        raise ValueError(f"tier {name!r}: registered tiers are {', '.join(tier_names())}")
    return _CLASSES[name]


def configured_tiers(tiers: "TierConfig") -> list[TierSpec]:
    """The tiers a configuration turns on, in lookup order: the built-in ones (by their own keys),
    then those named in its `tiers` option, in the order given."""
    specs = []
    for name in [*BUILTIN, *(n for n in tiers.tiers if n not in BUILTIN)]:
        if name not in tier_names():
            raise ValueError(f"tiers: {name!r} is not a registered tier; registered tiers are "
                             f"{', '.join(tier_names())}")
        spec = tier_class(name).from_config(tiers, tiers.tiers.get(name))
        if spec is not None:
            specs.append(spec)
    return specs
