"""vLLM general plugin (entry point `vllm.general_plugins: kvplug`), run in every vLLM process.

It registers KVPlugConnector by name, so `"kv_connector": "KVPlugConnector"` works with no
`kv_connector_module_path`, and it records the model each model runner loads: a KV connector
gets no model handle, and blending runs the model's own layers. Loading it twice in one
process is harmless.

    register()           the entry point
    loaded_model()       the model this process's runner loaded, or None
"""
from __future__ import annotations

import functools
import logging

CONNECTOR_NAME = "KVPlugConnector"
logger = logging.getLogger("kvplug")
_MODEL = None


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvplug.connector.connector", "KVPlugConnector")
    _capture_models()


def loaded_model():
    return _MODEL


def _capture_models() -> None:
    runners = []
    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):
        try:
            runners.append(getattr(__import__(module, fromlist=[name]), name))
        except Exception as e:  # noqa: BLE001 - a runner this platform lacks is no error
            logger.debug("kvplug: %s.%s not importable (%s)", module, name, e)
    for cls in runners:
        load = cls.__dict__.get("load_model")
        if load is None or getattr(load, "_kvplug_wrapped", False):
            continue
        setattr(cls, "load_model", _recording(load))


def _recording(load):
    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        global _MODEL
        out = load(self, *args, **kwargs)
        _MODEL = getattr(self, "model", None)
        return out

    load_model._kvplug_wrapped = True
    return load_model
