"""The `kvplug` command line (entry point kvplug.cli.main:main).

    kvplug stats DISK_PATH | --url URL [--json]   what a cache directory or a live server holds
    kvplug clear DISK_PATH [--yes]                remove kvplug unit files, nothing else
    kvplug warm --model M --disk-path D DOCS_DIR  precompute and store the KV of documents
    kvplug bench ARGS...                          benchmarks/offload.py of the source checkout

Modules: main (argparse, dispatch, error handling), cache_dir (read-only scan, clear plan),
metrics (Prometheus scrape), warm (offline vLLM engine), bench (forwarder), common (errors,
tables). Only warm imports vLLM/torch, and only when it runs.
"""
