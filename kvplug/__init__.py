"""kvplug: KV-cache offload, sharing and blending for vLLM's v1 engine.

Layering (imports only go downward): core -> ops -> {tiers, blend} -> connector.
Only kvplug.connector imports vLLM.
"""

__version__ = "0.1.0"
