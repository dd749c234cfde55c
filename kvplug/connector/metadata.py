"""What the scheduler half tells the worker half for one engine step (serialisable: only
ints, bools and bytes). The worker runs the lists in field order; see tiers/manager.py for
why that order is safe."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class KVPlugMetadata(KVConnectorMetadata):
    demotes: list[tuple[bytes, int]] = field(default_factory=list)  # (key, cpu slot): slot -> disk
    disk_deletes: list[bytes] = field(default_factory=list)
    # (key, gpu block, cpu slot or -1 for disk, promote cpu slot or -1)
    loads: list[tuple[bytes, int, int, int]] = field(default_factory=list)
    # (key, gpu block, cpu slot or -1, write to disk)
    saves: list[tuple[bytes, int, int, bool]] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.demotes or self.disk_deletes or self.loads or self.saves)
