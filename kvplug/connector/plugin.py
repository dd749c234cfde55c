"""vLLM general plugin (entry point `vllm.general_plugins: kvplug`), run in every vLLM process.

It registers KVPlugConnector by name, so `"kv_connector": "KVPlugConnector"` works with no
`kv_connector_module_path`, and it records the model each model runner loads: a KV connector
gets no model handle, and blending runs the model's own layers. Before a runner reads any
weight, kvplug's `kv_connector_extra_config` is validated, so a bad key or value fails start-up
at once, not after the weights are in (vLLM builds the connector only after the model loads).
Loading it twice in one process is harmless. (How all this is done is vLLM-internal: see
vllm_compat.)

    register()           the entry point
    check_config(vllm_config)   validate kvplug's config (before the model loads)
    loaded_model()       the model this process's runner loaded, or None
"""
from __future__ import annotations

from kvplug.config import KVPlugConfig
from kvplug.connector import vllm_compat

CONNECTOR_NAME = "KVPlugConnector"
_MODEL = None


def register() -> None:
    vllm_compat.register_connector(CONNECTOR_NAME, "kvplug.connector.connector", "KVPlugConnector")
    vllm_compat.capture_loaded_models(_record, before_load=check_config)


def check_config(vllm_config) -> None:
    """ValueError naming the key when kvplug is the engine's connector and its config is bad."""
    extra = vllm_compat.connector_extra_config(vllm_config, CONNECTOR_NAME) if vllm_config is not None else None
    if extra is not None:
        KVPlugConfig.from_dict(extra)


def _record(model) -> None:
    global _MODEL
    _MODEL = model


def loaded_model():
    return _MODEL
