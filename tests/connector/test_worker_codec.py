"""WorkerHalf with disk_codec / remote_codec on CPU tensors, driven by hand-built metadata (no engine).

Oracle: a block or chunk that went through a compressed tier comes back as its canonical K/V after the
op's own round trip (dequantize_kv_ref(quantize_kv_ref(KV))), read by plain indexing; every other byte
is unchanged. The opaque path runs over a fake backend whose write op interleaves K and V of a head
(so the codec must use the probed element order), the canonical path over vLLM's CUDA layout on CPU.
The scheduler's disk accounting (EngineFacts.stored_bytes) must equal what the worker writes.
"""
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "blend"))
from fakes import BS, facts  # noqa: E402
from test_blender import Toy  # noqa: E402

from kvplug.blend.blender import Blender  # noqa: E402
from kvplug.config import KVPlugConfig  # noqa: E402
from kvplug.connector import kv_views, vllm_compat  # noqa: E402
from kvplug.connector.engine_facts import EngineFacts  # noqa: E402
from kvplug.connector.metadata import BlockLoad, BlockSave, ChunkSave, KVPlugMetadata  # noqa: E402
from kvplug.connector.worker import WorkerHalf  # noqa: E402
from kvplug.ops.gather_scatter import gather_chunks_ref  # noqa: E402
from kvplug.ops.kv_layout import make_vllm_caches, vllm_kv_views  # noqa: E402
from kvplug.ops.kv_quant import dequantize_kv_ref, quantize_kv_ref  # noqa: E402
from kvplug.tiers.codec import make_codec  # noqa: E402
from kvplug.tiers.disk import unit_path  # noqa: E402
from kvplug.tiers.disk_format import read_header  # noqa: E402

F = facts(num_layers=3, kv_heads=2, head_dim=8, num_blocks=32)  # bf16
KV, D = 2, 8


class PackedAttention:
    """A CPU-like backend: per layer [blocks, KV, BS, 2D], K and V of a head interleaved (K even, V odd)."""

    class impl:  # noqa: N801 - vLLM's attribute name
        @staticmethod
        def do_kv_cache_update(layer, k, v, cache, slots):
            b, o = slots // BS, slots % BS
            cache[b, :, o, 0::2] = k
            cache[b, :, o, 1::2] = v


def packed_kv(caches, block):
    """Canonical [L, 2, BS, KV, D] of a block, by hand."""
    return torch.stack([torch.stack([c[block].transpose(0, 1)[..., 0::2], c[block].transpose(0, 1)[..., 1::2]])
                        for c in caches])


def round_trip(kv, name):
    c = make_codec(name)
    return dequantize_kv_ref(quantize_kv_ref(kv, c.bits, c.group), c.bits, c.group, kv.dtype)


def disk_payload_bytes(root, key):
    with open(unit_path(root, key, 0), "rb") as f:
        return read_header(f).nbytes


@pytest.fixture
def packed_backend(monkeypatch):
    monkeypatch.setattr(vllm_compat, "attention_layer", lambda name: PackedAttention())


def opaque_worker(tmp_path, **extra):
    cfg = {"cpu_bytes": 0, "disk_path": str(tmp_path / "disk"), **extra}
    w = WorkerHalf(KVPlugConfig.from_dict(cfg), F, 0, "test:packed")
    g = torch.Generator().manual_seed(0)
    w.register({n: torch.randn((F.num_blocks, KV, BS, 2 * D), generator=g).to(torch.bfloat16) for n in F.layer_names})
    return w


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_opaque_blocks_round_trip_through_the_probed_element_order(tmp_path, packed_backend, name):
    w = opaque_worker(tmp_path, disk_codec=name)
    want = round_trip(packed_kv(w.caches, 2), name)
    w.save(KVPlugMetadata(saves=[BlockSave("a", b"o" * 32, 2, (), ("disk",), 0.0)]))
    w.stores["disk"].flush()
    assert disk_payload_bytes(w.stores["disk"].root, b"o" * 32) == F.stored_bytes(F.unit_bytes, name) < F.unit_bytes
    w.load(KVPlugMetadata(loads=[BlockLoad("b", b"o" * 32, 9, "disk", ())]))
    assert not w.take_load_errors()
    assert torch.equal(packed_kv(w.caches, 9), want)


def test_without_a_probe_blocks_stay_out_of_the_compressed_tier(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(vllm_compat, "attention_layer", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="kvplug"):
        w = opaque_worker(tmp_path, disk_codec="int8")
    assert "prefix blocks cannot be encoded" in caplog.text
    w.save(KVPlugMetadata(saves=[BlockSave("a", b"n" * 32, 2, (), ("disk",), 0.0)]))
    w.stores["disk"].flush()
    assert not unit_path(w.stores["disk"].root, b"n" * 32, 0).exists() and w.stores["disk"].stats.take().dropped == 1


def test_a_codec_is_off_for_a_tier_that_is_off(tmp_path, packed_backend):
    w = opaque_worker(tmp_path, remote_codec="int4")  # no remote_url: nothing to encode for
    assert w.stores["disk"].codec is None and w.kv_views == {}


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_canonical_blocks_round_trip_through_a_compressed_disk(tmp_path, name):
    g = torch.Generator().manual_seed(1)
    caches = make_vllm_caches(F.num_layers, F.num_blocks, BS, KV, D, torch.bfloat16, "cpu", "LBNHC", generator=g)
    cfg = {"cpu_bytes": 0, "disk_path": str(tmp_path / "disk"), "disk_codec": name}
    w = WorkerHalf(KVPlugConfig.from_dict(cfg), F, 0, "test:layout", io="canonical")
    w.register(dict(zip(F.layer_names, caches)))
    views = [vllm_kv_views(c) for c in caches]
    slots = lambda b: torch.arange(b * BS, (b + 1) * BS)  # noqa: E731
    want = round_trip(gather_chunks_ref(views, slots(3)), name)
    w.save(KVPlugMetadata(saves=[BlockSave("a", b"c" * 32, 3, (), ("disk",), 0.0)]))
    w.stores["disk"].flush()
    assert disk_payload_bytes(w.stores["disk"].root, b"c" * 32) == F.stored_bytes(F.unit_bytes, name)
    w.load(KVPlugMetadata(loads=[BlockLoad("b", b"c" * 32, 11, "disk", ())]))
    assert not w.take_load_errors() and torch.equal(gather_chunks_ref(views, slots(11)), want)


def test_a_chunk_with_its_sidecar_round_trips_and_is_charged_what_it_takes(tmp_path, packed_backend):
    w = opaque_worker(tmp_path, disk_codec="int8")
    toy = Toy()
    w.blender = Blender(toy, cluster_tokens=4)
    w.chunk_layout = w._loader.chunk_layout = "chunk-test"
    kv_views.add_chunk_view(w.kv_views, w.chunk_layout, w.blender.fmt)
    g = torch.Generator().manual_seed(2)
    n = 37
    for i in range(Toy.num_layers):
        toy.write_kv(i, torch.randn(n, Toy.num_kv_heads, Toy.head_dim, generator=g),
                     torch.randn(n, Toy.num_kv_heads, Toy.head_dim, generator=g), torch.arange(n))
    payload = w.blender.fmt.pack(w.blender.read_chunks([(torch.arange(n), 0)])[0])
    w.save(KVPlugMetadata(chunk_saves=[ChunkSave("a", b"h" * 32, 0, n, [0, 1, 2], (), ("disk",), 0.0, payload.numel())]))
    w.stores["disk"].flush()
    got = w.stores["disk"].get(b"h" * 32, "chunk-test")
    kv_bytes = n * 2 * Toy.num_layers * Toy.num_kv_heads * Toy.head_dim * 4
    assert torch.equal(got[kv_bytes:], payload[kv_bytes:])  # the clusters, unchanged
    assert torch.equal(w.blender.fmt.kv(got, n), round_trip(w.blender.fmt.kv(payload, n), "int8"))
    token = 2 * Toy.num_layers * Toy.num_kv_heads * Toy.head_dim * 4
    toy_facts = EngineFacts(namespace=b"n" * 32, block_size=BS, unit_bytes=BS * token, layer_names=("a",) * Toy.num_layers,
                            num_blocks=8, tp_size=1, kv_heads=Toy.num_kv_heads,
                            head_dim=Toy.head_dim, itemsize=4, cluster_tokens=4)
    assert toy_facts.num_layers == Toy.num_layers and toy_facts.chunk_bytes(n) == payload.numel()
    assert disk_payload_bytes(w.stores["disk"].root, b"h" * 32) == toy_facts.stored_bytes(payload.numel(), "int8")
