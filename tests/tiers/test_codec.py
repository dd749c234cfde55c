"""Compressed units in the disk and remote tiers (kvplug/tiers/codec.py).

The oracle of a stored unit is the op's own round trip: the payload read back is the payload with its
KV replaced by dequantize_kv(quantize_kv(KV)) (kvplug/ops/kv_quant.py, tested against its spec), and
every other byte (a chunk's cluster sidecar) unchanged. Views: canonical block rows, chunks whose
token count comes from their size, and opaque blocks whose K/V elements sit in a shuffled order.
The tiers: a unit written with one codec is a miss for another codec or none (and vice versa),
corrupt or foreign encoded units are misses counted in the store's corruption counter, and a unit the
codec cannot represent (|KV| past fp16's range) is not stored.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_server import RedisServer, redis_available  # noqa: E402

from kvplug.ops.kv_quant import dequantize_kv_ref, quantize_kv_ref  # noqa: E402
from kvplug.tiers.codec import PermutedView, TokensView, UnitCodec, make_codec  # noqa: E402
from kvplug.tiers.disk import DiskStore, unit_path  # noqa: E402
from kvplug.tiers.disk_format import PREFIX_BYTES, checksum, encode_header, read_header  # noqa: E402

L, KV, D, BS = 3, 2, 16, 8
BLOCK, CHUNK, OPAQUE = "kv-tokens-v1[test]", "chunk-v2|test", "opaque|test"
GEN = torch.Generator().manual_seed(5)


def kv_tensor(T, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, 2, T, KV, D, generator=g) * 2 + 0.5).to(dtype)


def tail_of(T):  # a chunk-like sidecar whose size grows with T
    return 12 * -(-T // 4) + 2 * T


def round_tripped(kv, name):
    c = make_codec(name)
    return dequantize_kv_ref(quantize_kv_ref(kv, c.bits, c.group), c.bits, c.group, kv.dtype)


def shuffled_view(dtype=torch.bfloat16):
    perm = torch.randperm(2 * BS * KV * D, generator=torch.Generator().manual_seed(1))
    k_index, v_index = perm[:BS * KV * D].view(BS, KV * D), perm[BS * KV * D:].view(BS, KV * D)
    return PermutedView(L, KV, D, dtype, BS, k_index, v_index), k_index, v_index


def opaque_payload(kv, k_index, v_index):
    """Engine-like block bytes: K and V elements scattered where the backend would write them."""
    blocks = torch.full((L, 2 * BS * KV * D), float("nan"), dtype=kv.dtype)
    blocks[:, k_index.flatten()] = kv[:, 0].reshape(L, -1)
    blocks[:, v_index.flatten()] = kv[:, 1].reshape(L, -1)
    return blocks.view(torch.uint8).flatten()


def views(dtype=torch.bfloat16):
    opaque, _, _ = shuffled_view(dtype)
    return {BLOCK: TokensView(L, KV, D, dtype, tokens=BS), CHUNK: TokensView(L, KV, D, dtype, tail_nbytes=tail_of),
            OPAQUE: opaque}


def chunk_payload(T, dtype=torch.bfloat16, seed=0):
    kv = kv_tensor(T, dtype, seed)
    tail = torch.randint(0, 256, (tail_of(T),), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return kv, torch.cat([kv.reshape(-1).view(torch.uint8), tail]), tail


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_view_round_trips_to_the_ops_round_trip(name, dtype):
    codec = UnitCodec(make_codec(name), views(dtype))
    kv = kv_tensor(BS, dtype)
    block = kv.reshape(-1).view(torch.uint8)
    enc = codec.encode(block, BLOCK)
    assert enc.numel() == codec.codec.encoded_nbytes(L, BS, KV, D) < block.numel()
    assert torch.equal(codec.decode(enc, BLOCK), round_tripped(kv, name).reshape(-1).view(torch.uint8))

    for T in (1, 5, 37):  # partial key groups; the token count comes from the size
        kv, payload, tail = chunk_payload(T, dtype, seed=T)
        enc = codec.encode(payload, CHUNK)
        assert enc.numel() == codec.codec.encoded_nbytes(L, T, KV, D, tail_of(T))
        back = codec.decode(enc, CHUNK)
        assert torch.equal(back[-tail.numel():], tail)
        assert torch.equal(back[:-tail.numel()], round_tripped(kv, name).reshape(-1).view(torch.uint8))

    opaque, k_index, v_index = shuffled_view(dtype)
    codec.views[OPAQUE] = opaque
    raw = opaque_payload(kv_tensor(BS, dtype, 3), k_index, v_index)
    want = opaque_payload(round_tripped(kv_tensor(BS, dtype, 3), name), k_index, v_index)
    assert torch.equal(codec.decode(codec.encode(raw, OPAQUE), OPAQUE), want)


@pytest.mark.parametrize("name,ratio", [("int8", 0.5313), ("int4", 0.3126)])
def test_encoded_bytes_per_token_of_a_smollm2_block(name, ratio):
    """SmolLM2-135M (30 layers, 3 KV heads, head_dim 64, bf16), a 128-token block: codes plus fp16
    scale/zero per group (keys: 64 channels x 2 groups of 64 tokens for int8; values: 1 or 2 groups per
    head), plus the 32-byte header."""
    raw = 30 * 2 * 128 * 3 * 64 * 2
    assert make_codec(name).encoded_nbytes(30, 128, 3, 64) / raw == pytest.approx(ratio, abs=1e-4)


def test_units_the_codec_cannot_take_are_refused():
    codec = UnitCodec(make_codec("int8"), views())
    kv = kv_tensor(BS)
    assert codec.encode(kv.reshape(-1).view(torch.uint8), "another|layout") is None  # no view
    assert codec.encode(kv.reshape(-1).view(torch.uint8)[:-2], BLOCK) is None  # not a block's size
    assert codec.encode(torch.zeros(7, dtype=torch.uint8), CHUNK) is None  # no token count fits
    kv[0, 1, 3, 0, 5] = -1e5  # a group minimum below fp16's range: no finite zero
    assert codec.encode(kv.reshape(-1).view(torch.uint8), BLOCK) is None


def test_a_codec_shared_by_two_stores_encodes_a_payload_once():
    codec = UnitCodec(make_codec("int8"), views(), sharers=2)
    payload = kv_tensor(BS).reshape(-1).view(torch.uint8)
    first = codec.encode(payload, BLOCK)
    assert codec.encode(payload, BLOCK) is first  # the second store's call
    third = codec.encode(payload, BLOCK)  # a later put of the same tensor: encoded again
    assert third is not first and torch.equal(third, first)
    assert codec.encode(payload.clone(), BLOCK) is not third  # another tensor is another unit


def test_a_strided_block_order_is_copied_by_views_with_the_gathers_result():
    """vLLM's CPU block [KV, T, 2D] (K then V of a head's token): an affine order, taken through strided
    views; the same bytes as the general index gather."""
    idx = torch.arange(KV * BS * 2 * D).view(KV, BS, 2 * D)
    k_index = idx[..., :D].permute(1, 0, 2).reshape(BS, KV * D)
    v_index = idx[..., D:].permute(1, 0, 2).reshape(BS, KV * D)
    fast = PermutedView(L, KV, D, torch.bfloat16, BS, k_index, v_index)
    slow = PermutedView(L, KV, D, torch.bfloat16, BS, k_index, v_index)
    slow._strided = None
    assert fast._strided is not None
    raw = opaque_payload(kv_tensor(BS, seed=4), k_index, v_index)
    assert torch.equal(fast.kv(raw, BS), slow.kv(raw, BS)) and torch.equal(fast.kv(raw, BS), kv_tensor(BS, seed=4))
    outs = []
    for view in (fast, slow):
        payload, kv = view.empty(BS)
        kv.copy_(kv_tensor(BS, seed=5))
        view.finish(payload, kv)
        outs.append(payload)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], opaque_payload(kv_tensor(BS, seed=5), k_index, v_index))


def test_a_permuted_view_must_cover_the_block_once():
    perm = torch.arange(2 * BS * KV * D)
    perm[5] = 6
    with pytest.raises(ValueError, match="exactly once"):
        PermutedView(L, KV, D, torch.bfloat16, BS, perm[:BS * KV * D].view(BS, -1), perm[BS * KV * D:].view(BS, -1))


def disk(tmp_path, name, **kw):
    codec = None if name == "none" else UnitCodec(make_codec(name), views())
    return DiskStore(tmp_path, BLOCK, codec=codec, **kw)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_disk_serves_decoded_units_and_stores_fewer_bytes(tmp_path, name):
    key = b"a" * 32
    kv, payload, _ = chunk_payload(21)
    with disk(tmp_path / "plain", "none") as plain, disk(tmp_path / "coded", name) as coded:
        for store in (plain, coded):
            store.put(key, payload, CHUNK)
            store.flush()
        got = coded.get(key, CHUNK)
        assert torch.equal(got[:kv.numel() * 2], round_tripped(kv, name).reshape(-1).view(torch.uint8))
        assert torch.equal(got[kv.numel() * 2:], payload[kv.numel() * 2:])
        small, big = (unit_path(s.root, key, 0).stat().st_size for s in (coded, plain))
        encoded = coded.codec.codec.encoded_nbytes(L, 21, KV, D, tail_of(21))
        tag = len(coded.codec.stored_layout(CHUNK)) - len(CHUNK)
        assert small - encoded == big - payload.numel() + tag  # the same file header (+ the codec's tag)
        assert coded.stats.take().bytes_written == small


def test_a_unit_written_with_one_codec_is_a_miss_for_another(tmp_path):
    key = b"b" * 32
    kv = kv_tensor(BS)
    for writer, reader in (("int8", "int4"), ("int4", "none"), ("none", "int8")):
        with disk(tmp_path, writer) as w:
            w.put(key, kv.reshape(-1).view(torch.uint8))
            w.flush()
        with disk(tmp_path, reader) as r:
            assert r.get(key) is None
            s = r.stats.take()
            assert (s.hits, s.corrupt) == (0, 1)  # a foreign unit, counted and removed
        assert not unit_path(tmp_path, key, 0).exists()


def rewrite(path: Path, edit) -> None:
    """Apply edit(payload bytearray) and write the file back with valid CRCs (a foreign encoder's unit)."""
    with open(path, "rb") as f:
        header = read_header(f)
        payload = bytearray(f.read())
    edit(payload)
    path.write_bytes(encode_header(header.key, header.layout, len(payload), checksum(payload)) + payload)


@pytest.mark.parametrize("damage", ["flipped byte", "other token count", "other bits", "truncated codes"])
def test_corrupt_or_foreign_encoded_files_are_counted_misses(tmp_path, damage):
    key = b"c" * 32
    _, payload, _ = chunk_payload(13)
    with disk(tmp_path, "int8") as store:
        store.put(key, payload, CHUNK)
        store.flush()
        path = unit_path(tmp_path, key, 0)
        if damage == "flipped byte":
            data = bytearray(path.read_bytes())
            data[-40] ^= 0x10
            path.write_bytes(bytes(data))
        elif damage == "other token count":
            rewrite(path, lambda p: p.__setitem__(slice(12, 16), (12).to_bytes(4, "little")))
        elif damage == "other bits":
            rewrite(path, lambda p: p.__setitem__(4, 4))
        else:
            rewrite(path, lambda p: p.__delitem__(slice(-100, None)))
        assert store.get(key, CHUNK) is None
        assert store.stats.take().corrupt == 1
        assert not path.exists()


def test_an_unencodable_unit_is_dropped_not_written(tmp_path):
    kv = kv_tensor(BS)
    kv[1, 0, 2, 1, 3] = -7e4
    with disk(tmp_path, "int4") as store:
        store.put(b"d" * 32, kv.reshape(-1).view(torch.uint8))
        store.flush()
        assert store.stats.take().dropped == 1
    assert not unit_path(tmp_path, b"d" * 32, 0).exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not redis_available():
        pytest.skip("redis-server not on PATH")
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


def remote(server, name):
    from kvplug.tiers.remote import RemoteStore

    codec = None if name == "none" else UnitCodec(make_codec(name), views())
    return RemoteStore(server.url, BLOCK, namespace="codec-test", timeout_s=2.0, codec=codec)


def test_remote_serves_decoded_units_and_refuses_other_codecs(server):
    from kvplug.tiers.remote import redis_key

    key = b"e" * 32
    opaque, k_index, v_index = shuffled_view()
    kv = kv_tensor(BS, seed=9)
    raw = opaque_payload(kv, k_index, v_index)
    with remote(server, "int8") as w:
        w.put(key, raw, layout=OPAQUE)
        w.flush()
        assert torch.equal(w.get(key, OPAQUE), opaque_payload(round_tripped(kv, "int8"), k_index, v_index))
        stored = server.client().strlen(redis_key("codec-test", key, 0))
        encoded = w.codec.codec.encoded_nbytes(L, BS, KV, D)
        assert stored == len(encode_header(key, w.codec.stored_layout(OPAQUE), encoded, "0" * 8)) + encoded
        assert w.stats.take().bytes_written == stored
    with remote(server, "int4") as r:
        assert r.get(key, OPAQUE) is None and r.stats.take().corrupt == 1
    assert server.client().exists(redis_key("codec-test", key, 0)) == 0  # deleted as foreign


def test_remote_corrupt_encoded_value_is_a_counted_miss(server):
    from kvplug.tiers.remote import redis_key

    key = b"f" * 32
    _, payload, _ = chunk_payload(9)
    with remote(server, "int4") as store:
        store.put(key, payload, layout=CHUNK)
        store.flush()
        rkey = redis_key("codec-test", key, 0)
        value = bytearray(server.client().get(rkey))
        value[PREFIX_BYTES + 200] ^= 1 if len(value) > PREFIX_BYTES + 200 else 0
        value[-3] ^= 0x40
        server.client().set(rkey, bytes(value))
        assert store.get(key, CHUNK) is None and store.stats.take().corrupt == 1
