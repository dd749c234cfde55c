"""KVPlugConnector is found by name (entry point) and by module path, as README says; a bad
config fails where vLLM first hands it over, before a model runner reads any weight."""
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest


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


def test_a_bad_config_stops_the_model_runner_before_its_loader_runs():
    from kvplug.connector import vllm_compat
    from kvplug.connector.plugin import check_config

    loaded = []
    wrapped = vllm_compat._recording(lambda runner: loaded.append(runner), on_load=lambda m: None,
                                     before_load=check_config)
    ktc = SimpleNamespace(kv_connector="KVPlugConnector", kv_connector_extra_config={"eviction_policy": "mru"})
    runner = SimpleNamespace(vllm_config=SimpleNamespace(kv_transfer_config=ktc), model=None)
    with pytest.raises(ValueError, match="eviction_policy='mru': allowed values are"):
        wrapped(runner)
    assert loaded == []  # the weights loader never ran
    ktc.kv_connector_extra_config = {"eviction_policy": "lru"}
    wrapped(runner)
    assert loaded == [runner]
    ktc.kv_connector, ktc.kv_connector_extra_config = "OtherConnector", {"not": "ours"}
    wrapped(runner)  # another connector's config is not kvplug's to judge
    assert len(loaded) == 2


def test_the_config_classmethod_vllm_calls_while_building_its_config_refuses_bad_keys():
    from kvplug.connector.connector import KVPlugConnector

    with pytest.raises(ValueError, match="unknown key"):
        KVPlugConnector.requires_piecewise_for_cudagraph({"no_such_key": 1})
    assert KVPlugConnector.requires_piecewise_for_cudagraph({"cpu_bytes": 1e6}) is False
