"""KVPlugConnector: vLLM's KV connector interface, split into a scheduler and a worker half.

vLLM builds one instance per role: the scheduler's sees requests and plans, each worker's
sees tensors and executes. They talk only through KVPlugMetadata (scheduler -> worker) and
KVConnectorOutput (worker -> scheduler: load errors, stats).
"""
from __future__ import annotations

import logging
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from kvplug.config import KVPlugConfig, check_blend_for_model
from kvplug.connector import vllm_compat
from kvplug.connector.engine_facts import EngineFacts
from kvplug.connector.metadata import KVPlugHandshake, KVPlugMetadata
from kvplug.connector.stats import KVPlugPromMetrics, KVPlugStats

logger = logging.getLogger("kvplug")


class KVPlugConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_compat.transfer_config(vllm_config)
        self.cfg = KVPlugConfig.from_dict(transfer.extra)
        self.facts = EngineFacts.from_vllm(vllm_config, kv_cache_config, self.cfg)
        check_blend_for_model(self.cfg.blend, self.facts.num_layers)
        self._scheduler = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from kvplug.connector.scheduler import SchedulerHalf

            # A cache is best-effort: a unit that cannot be read is recomputed, never a failed request.
            vllm_compat.recompute_failed_loads(vllm_config)
            self._scheduler = SchedulerHalf(self.cfg, self.facts, load=transfer.load, save=transfer.save,
                                            separator=_separator_ids(vllm_config, self.cfg))
        else:
            from kvplug.connector.worker import WorkerHalf

            self._worker = WorkerHalf(self.cfg, self.facts, vllm_compat.tp_rank(), vllm_compat.layer_tag(vllm_config))

    @property
    def requires_kv_delivery(self) -> bool:
        return False

    # ---- worker -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register(kv_caches)

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, KVPlugMetadata):
            self._worker.begin_step(connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, KVPlugMetadata):
            self._worker.load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # synchronous loads are done in start_load_kv, asynchronous ones reported by get_finished

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # whole blocks are saved after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, KVPlugMetadata):
            self._worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # Nothing is sent; requests whose asynchronous loads (and blend) are in place are received.
        return None, self._worker.finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def get_handshake_metadata(self):
        # What this rank found in the tiers at start-up: vLLM hands it to the scheduler's half
        # (set_xfer_handshake_metadata) after every worker registered its caches, before serving.
        return self._worker.handshake() if self._worker is not None else None

    def get_kv_connector_stats(self):
        half = self._worker or self._scheduler
        return half.take_stats()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()

    # ---- scheduler ----------------------------------------------------------------------
    def set_xfer_handshake_metadata(self, metadata) -> None:
        self._scheduler.restore([m for m in metadata.values() if isinstance(m, KVPlugHandshake)])

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self._scheduler.num_matched(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVPlugMetadata:
        return self._scheduler.build_meta(scheduler_output)

    def build_connector_worker_meta(self):
        return self._worker.take_worker_meta()

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        if meta is not None:
            self._scheduler.on_worker_meta(meta)
        self._scheduler.loads_landed(connector_output.finished_recving)

    def request_finished(self, request, block_ids):
        # An asynchronous load still in flight writes these blocks: vLLM frees them once it lands.
        return self._scheduler.finished(request), None

    # ---- start-up -----------------------------------------------------------------------
    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config) -> bool:
        # vLLM asks this while it builds its config (in the front end, with CUDA graphs on): the
        # first time it hands kvplug its config, so a bad key fails there, before any model
        # loads. (Elsewhere the plugin's check before load_model catches it: plugin.check_config.)
        KVPlugConfig.from_dict(extra_config)
        return False  # nothing is done layer by layer inside the forward pass

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config) -> bool:
        # vLLM >= 0.33 asks before sleep mode frees and remaps the KV caches. kvplug keeps views
        # of the registered caches (block IO, blender, the CPU tier's transfers): it cannot follow
        # a remap, so an engine with sleep mode refuses it at start-up.
        return False

    # ---- stats plumbing -----------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return KVPlugStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVPlugPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _separator_ids(vllm_config, cfg: KVPlugConfig) -> tuple[int, ...]:
    """chunk_separator as the token ids it has inside a prompt (see core/chunking.separator_ids)."""
    if not cfg.blend.enabled:
        return ()
    from transformers import AutoTokenizer

    from kvplug.core.chunking import separator_ids

    mc = vllm_compat.engine_config(vllm_config)
    try:
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                            trust_remote_code=mc.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loader failure gets the same advice
        raise ValueError(f"blend=true: cannot load the tokenizer of {mc.tokenizer} to find chunk_separator's "
                         f"token ids ({e}); fix the tokenizer, or set blend=false") from e
    ids = tok(cfg.blend.chunk_separator, add_special_tokens=False).input_ids
    try:
        return separator_ids(ids, tok.decode)
    except ValueError as e:
        raise ValueError(f"chunk_separator={cfg.blend.chunk_separator!r}: {e}") from e
