"""KVPlugConnector is found by name (entry point) and by module path, as README says."""
from importlib.metadata import entry_points


def test_entry_point_registers_the_connector_by_name():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "kvplug"]
    register = ep.load()
    register()
    register()  # vLLM loads plugins once per process, but twice must be harmless
    cls = KVConnectorFactory.get_connector_class(KVTransferConfig(kv_connector="KVPlugConnector", kv_role="kv_both"))
    from kvplug.connector.connector import KVPlugConnector

    assert cls is KVPlugConnector


def test_module_path_form_works_too():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from kvplug.connector.connector import KVPlugConnector

    cfg = KVTransferConfig(kv_connector="KVPlugConnector", kv_connector_module_path="kvplug.connector", kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(cfg) is KVPlugConnector
