"""Fake vLLM objects for the connector halves' unit tests: a request, a scheduler output, engine
facts. They carry exactly the attributes kvplug reads (checked against vLLM 0.32's classes)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvplug.connector.engine_facts import EngineFacts

BS = 16  # block size of the fake engine
SEP = (901, 902)  # the separator's token ids


def facts(num_layers: int = 2, kv_heads: int = 2, head_dim: int = 8, num_blocks: int = 64) -> EngineFacts:
    token = 2 * num_layers * kv_heads * head_dim * 2  # bf16
    return EngineFacts(namespace=b"n" * 32, block_size=BS, unit_bytes=BS * token,
                       layer_names=tuple(f"layer.{i}" for i in range(num_layers)), num_blocks=num_blocks, tp_size=1,
                       kv_heads=kv_heads, head_dim=head_dim, itemsize=2)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    cache_salt: str | None = None
    kv_transfer_params: dict | None = None


def doc(seed: int, n: int = 40) -> list[int]:
    return [100 + (seed * 37 + i * 11) % 700 for i in range(n)]


def blend_prompt(*docs: list[int], question: int = 9) -> list[int]:
    """head + SEP + doc + ... + SEP + question tokens, as the chunker splits them."""
    out = doc(0, 20)
    for d in docs:
        out += list(SEP) + d
    return out + list(SEP) + [question] * 6


@dataclass
class NewReq:
    req_id: str
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class CachedReqs:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewReq] = field(default_factory=list)
    scheduled_cached_reqs: CachedReqs = field(default_factory=CachedReqs)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


def step_new(req: Request, blocks: list[int], computed: int, scheduled: int) -> SchedulerOutput:
    return SchedulerOutput([NewReq(req.request_id, (blocks,), computed)], CachedReqs(),
                           {req.request_id: scheduled})


def step_cached(req: Request, computed: int, scheduled: int, new_blocks=None, resumed=False) -> SchedulerOutput:
    cached = CachedReqs([req.request_id], [(new_blocks,) if new_blocks is not None else None],
                        {req.request_id} if resumed else set(), [computed])
    return SchedulerOutput([], cached, {req.request_id: scheduled})


def started_halves(extra: dict, engine: EngineFacts):
    """(SchedulerHalf, WorkerHalf) of one fake engine, started as vLLM starts them: the worker
    registers random bf16 caches of `engine`'s layers, the scheduler gets its handshake."""
    import torch

    from kvplug.config import KVPlugConfig
    from kvplug.connector.scheduler import SchedulerHalf
    from kvplug.connector.worker import WorkerHalf

    cfg = KVPlugConfig.from_dict(extra)
    w = WorkerHalf(cfg, engine, 0, "test:layout")
    g = torch.Generator().manual_seed(0)
    w.register({n: torch.randn((engine.num_blocks, 2, BS, 16), generator=g).to(torch.bfloat16)
                for n in engine.layer_names})
    s = SchedulerHalf(cfg, engine)
    s.restore([w.handshake()])
    return s, w
