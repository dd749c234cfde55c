"""Which kind of unit a layout tag names. Prefix blocks, blend chunks and SGLang pages share the
tiers (one disk_path may hold all of them), and only the tag tells them apart: a reader of a
unit still compares the whole tag for equality; these prefixes are for reports and counts
(`kvplug stats`). Torch-free, so the command line can import it cheaply.

    CHUNK_PREFIX               "chunk-v2|": every blend chunk's tag starts with it (the worker's chunk_layout)
    SGLANG_PREFIX              "sglang;": every SGLang page's tag (kvplug/sglang/keys.py layout_tag)
    KINDS                      the kinds, in report order: "block", "chunk", "sglang"
    unit_kind(layout) -> str   "chunk", "sglang", or "block" (vLLM prefix blocks: every other tag)
"""
from __future__ import annotations

CHUNK_PREFIX = "chunk-v2|"
SGLANG_PREFIX = "sglang;"
KINDS = ("block", "chunk", "sglang")


def unit_kind(layout: str) -> str:
    if layout.startswith(CHUNK_PREFIX):
        return "chunk"
    if layout.startswith(SGLANG_PREFIX):
        return "sglang"
    return "block"
