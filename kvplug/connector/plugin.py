"""vLLM general plugin (entry point `vllm.general_plugins: kvplug`), run in every vLLM process.

It registers KVPlugConnector by name, so `"kv_connector": "KVPlugConnector"` works with no
`kv_connector_module_path`, and it records the model each model runner loads: a KV connector
gets no model handle, and blending runs the model's own layers. Loading it twice in one
process is harmless. (How both are done is vLLM-internal: see vllm_compat.)

    register()           the entry point
    loaded_model()       the model this process's runner loaded, or None
"""
from __future__ import annotations

from kvplug.connector import vllm_compat

CONNECTOR_NAME = "KVPlugConnector"
_MODEL = None


def register() -> None:
    vllm_compat.register_connector(CONNECTOR_NAME, "kvplug.connector.connector", "KVPlugConnector")
    vllm_compat.capture_loaded_models(_record)


def _record(model) -> None:
    global _MODEL
    _MODEL = model


def loaded_model():
    return _MODEL
