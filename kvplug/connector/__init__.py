"""The only kvplug package that imports vLLM. `KVPlugConnector` is re-exported so that
`kv_connector_module_path: "kvplug.connector"` works too."""


def __getattr__(name):
    if name == "KVPlugConnector":
        from kvplug.connector.connector import KVPlugConnector

        return KVPlugConnector
    raise AttributeError(name)
