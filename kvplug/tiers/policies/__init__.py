"""Eviction policies for one tier: they order entries, they never hold data.

POLICIES maps each config name to its class; make_policy(name, capacity_bytes) builds one and
raises ValueError naming the allowed values for an unknown name. The interface and the
manager contract are in base.py.
"""

from __future__ import annotations

from .arc import ARCPolicy
from .base import EvictionPolicy
from .cost_aware import CostAwarePolicy
from .fifo import FIFOPolicy
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .s3fifo import S3FIFOPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    "arc": ARCPolicy,
    "cost_aware": CostAwarePolicy,
    "fifo": FIFOPolicy,
    "lfu": LFUPolicy,
    "lru": LRUPolicy,
    "s3fifo": S3FIFOPolicy,
}


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """A fresh policy for a tier of capacity_bytes; name is a key of POLICIES."""
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"eviction_policy={name!r}: allowed values are {', '.join(sorted(POLICIES))}")
    return cls(capacity_bytes)


__all__ = [
    "ARCPolicy",
    "CostAwarePolicy",
    "EvictionPolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "POLICIES",
    "S3FIFOPolicy",
    "make_policy",
]
