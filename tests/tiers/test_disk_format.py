"""The unit file format: round trips, precise layout, and that malformed input only raises CorruptUnit."""
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvplug.tiers import disk_format as fmt
from kvplug.tiers.disk_format import CorruptUnit

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_unit(nbytes=1000, layout="bf16:L2:H4:D64:B16", meta=None, seed=0):
    rng = np.random.default_rng(seed)
    key = rng.integers(1, 256, 32, dtype=np.uint8).tobytes()
    payload = rng.integers(1, 256, nbytes, dtype=np.uint8).tobytes()
    head = fmt.encode_header(key, layout, len(payload), fmt.checksum(payload), meta)
    return key, payload, head + payload


def decode_or_corrupt(buf):
    """Decoding must succeed or raise CorruptUnit; anything else fails the test."""
    try:
        return fmt.decode_unit(buf)
    except CorruptUnit as e:
        assert isinstance(e.reason, str) and e.reason
        return None


@pytest.mark.parametrize("nbytes", [0, 1, 4097, 3 << 20])
def test_round_trip(nbytes):
    key, payload, unit = make_unit(nbytes, meta={"kind": "block", "tokens": 16}, seed=nbytes)
    header, view = fmt.decode_unit(unit)
    assert header.key == key and header.layout == "bf16:L2:H4:D64:B16"
    assert header.nbytes == nbytes and header.meta == {"kind": "block", "tokens": 16}
    assert bytes(view) == payload and header.file_bytes == len(unit)


def test_layout_is_what_the_docstring_says():
    key, payload, unit = make_unit(333, meta={"a": "b"})
    magic, version, hlen, hcrc = struct.unpack_from("<7sBII", unit)
    assert (magic, version) == (b"KVPLUG\0", 1)
    body = unit[16:16 + hlen]
    assert zlib.crc32(body) == hcrc
    doc = json.loads(body.decode("utf-8"))
    assert doc == {"version": 1, "key": key.hex(), "layout": "bf16:L2:H4:D64:B16", "nbytes": 333,
                   "checksum_algo": "crc32", "checksum": f"{zlib.crc32(payload):08x}", "meta": {"a": "b"}}
    assert unit[16 + hlen:] == payload


def test_read_header_leaves_stream_at_payload():
    _, payload, unit = make_unit(500)
    f = io.BytesIO(unit)
    header = fmt.read_header(f)
    assert f.tell() == header.payload_offset
    fmt.verify(header, f.read())


def test_checksum_accepts_numpy_and_memoryview():
    data = np.random.default_rng(1).integers(1, 256, 10_000, dtype=np.uint8)
    assert fmt.checksum(data) == fmt.checksum(memoryview(data.tobytes())) == fmt.checksum(data.tobytes())


@pytest.mark.parametrize("kwargs, match", [
    (dict(key=b"short"), "key"),
    (dict(layout=7), "layout"),
    (dict(payload_nbytes=-1), "payload_nbytes"),
    (dict(payload_nbytes=True), "payload_nbytes"),
    (dict(checksum="XYZ"), "checksum"),
    (dict(meta={"a": 1.5}), "meta"),
    (dict(meta={"a": True}), "meta"),
    (dict(meta={"big": "x" * (70 << 10)}), "header is"),
])
def test_encode_rejects_bad_arguments(kwargs, match):
    args = dict(key=os.urandom(32), layout="L", payload_nbytes=3, checksum="0a0b0c0d", meta=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fmt.encode_header(**args)


def with_header(doc_bytes: bytes, version=1) -> bytes:
    """A prefix with a correct header CRC around arbitrary header bytes."""
    return struct.pack("<7sBII", b"KVPLUG\0", version, len(doc_bytes), zlib.crc32(doc_bytes)) + doc_bytes


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d.update(key="AB" * 32), "key"),
    (lambda d: d.update(key=d["key"][:-2]), "key"),
    (lambda d: d.update(nbytes="3"), "nbytes"),
    (lambda d: d.update(nbytes=-3), "nbytes"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(layout=None), "layout"),
    (lambda d: d.update(checksum_algo="md5"), "algorithm"),
    (lambda d: d.update(checksum=12345678), "checksum"),
    (lambda d: d.update(meta={"a": [1]}), "meta"),
    (lambda d: d.pop("key"), "key"),
])
def test_bad_header_fields(mutate, reason):
    _, payload, unit = make_unit(64)
    hlen = struct.unpack_from("<I", unit, 8)[0]
    doc = json.loads(unit[16:16 + hlen])
    mutate(doc)
    with pytest.raises(CorruptUnit, match=reason):
        fmt.decode_unit(with_header(json.dumps(doc).encode()) + payload)


@pytest.mark.parametrize("body, reason", [
    (b'{"a":1,"a":2}', "duplicate"),
    (b'{"nbytes":NaN}', "NaN"),
    (b"[1,2,3]", "not an object"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"[" * 60000, "JSON"),
    (b'{"nbytes":' + b"9" * 5000 + b"}", "JSON"),
])
def test_bad_header_json(body, reason):
    with pytest.raises(CorruptUnit, match=reason):
        fmt.decode_unit(with_header(body))


def test_bad_prefix():
    _, _, unit = make_unit(10)
    with pytest.raises(CorruptUnit, match="magic"):
        fmt.decode_unit(b"NOTKVPL" + unit[7:])
    with pytest.raises(CorruptUnit, match="version"):
        fmt.decode_unit(unit[:7] + b"\x02" + unit[8:])
    with pytest.raises(CorruptUnit, match="header length"):
        fmt.decode_unit(unit[:8] + struct.pack("<I", fmt.MAX_HEADER_BYTES + 1) + unit[12:])
    with pytest.raises(CorruptUnit, match="payload is"):
        fmt.decode_unit(unit + b"\x01")


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data):
    decode_or_corrupt(data)
    decode_or_corrupt(b"KVPLUG\0\x01" + data)


@FUZZ
@given(st.data())
def test_fuzz_every_truncation_is_detected(data):
    _, _, unit = make_unit(data.draw(st.integers(1, 300)), meta={"m": "v"})
    cut = data.draw(st.integers(0, len(unit) - 1))
    assert decode_or_corrupt(unit[:cut]) is None


@FUZZ
@given(st.data())
def test_fuzz_every_bit_flip_is_detected(data):
    _, _, unit = make_unit(data.draw(st.integers(1, 300)), meta={"m": "v", "n": 3})
    flips = data.draw(st.lists(st.integers(0, 8 * len(unit) - 1), min_size=1, max_size=3, unique=True))
    buf = bytearray(unit)
    for bit in flips:
        buf[bit // 8] ^= 1 << (bit % 8)
    # CRC-32 detects every error of up to 3 bits in messages this short (Hamming distance >= 4).
    assert decode_or_corrupt(bytes(buf)) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
field_values = {
    "version": st.just(1) | json_values, "key": st.just("ab" * 32) | json_values,
    "layout": st.text(max_size=10) | json_values, "nbytes": st.integers(-2, 5) | json_values,
    "checksum_algo": st.just("crc32") | json_values, "checksum": st.just("0" * 8) | json_values,
    "meta": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5)) | json_values,
}


@FUZZ
@given(st.fixed_dictionaries({}, optional=field_values), st.binary(max_size=8))
def test_fuzz_well_framed_headers(doc, payload):
    """Headers that pass the CRC but hold arbitrary JSON values reach the field checks."""
    decode_or_corrupt(with_header(json.dumps(doc).encode("utf-8", "surrogatepass")) + payload)
