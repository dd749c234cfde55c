"""kvplug's SGLang HiCache storage backend: the only package that imports sglang.

Load it with `--hicache-storage-backend dynamic` and `--hicache-storage-backend-extra-config
'{"backend_name": "kvplug", "module_path": "kvplug.sglang.backend", "class_name":
"KVPlugHiCacheStorage", "interface_v1": 1, "disk_path": ...}'` (see the README, "SGLang").

Modules (only backend imports sglang; the others are plain kvplug and work without it):
    backend        KVPlugHiCacheStorage, the HiCacheStorage subclass SGLang builds
    config         --hicache-storage-backend-extra-config -> BackendConfig (kvplug's one parser)
    keys           layout tags and 32-byte unit keys of SGLang pages
    pages          one page between SGLang's host pool and a kvplug payload
    store          the disk (+ TierIndex) and remote tiers under the host pool
    remote_clear   clear() of one layout's values in Redis
"""
