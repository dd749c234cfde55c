"""vLLM general plugin (entry point `vllm.general_plugins: kvplug`), run in every vLLM process.

It registers KVPlugConnector by name, so `"kv_connector": "KVPlugConnector"` works with no
`kv_connector_module_path`. Loading it twice in one process is harmless.
"""
from __future__ import annotations

CONNECTOR_NAME = "KVPlugConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvplug.connector.connector", "KVPlugConnector")
