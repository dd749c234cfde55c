"""KVPlugHiCacheStorage against SGLang's own interface and its built-in HiCacheFile as the reference:
every method, batch sizes 1..128, every host-pool layout, misses."""
import pytest

pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="sglang not installed: run `make sglang`")

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageExtraInfo  # noqa: E402

from sglang_helpers import file_backend, kvplug_backend, sglang_keys, slots  # noqa: E402
from sglang_host_pool import MHAHostPool, MLAHostPool, fill_random, page_bytes  # noqa: E402

GEN = torch.Generator().manual_seed(1234)


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


@pytest.fixture
def pool():
    p = MHAHostPool(pages=256)
    fill_random(p, GEN)
    return p


@pytest.fixture
def backend(pool, tmp_path):
    b = kvplug_backend(pool, disk_path=str(tmp_path / "kv"), disk_bytes=1e9)
    yield b
    b.close()


def save_then_scribble(backend, pool, keys, pages):
    """Write `pages` under `keys` (v1), return their bytes, then overwrite the whole pool."""
    want = [page_bytes(pool, p * pool.page_size) for p in pages]
    assert backend.batch_set_v1(keys, slots(pool, pages)) == [True] * len(keys)
    fill_random(pool, GEN)
    return want


def test_backend_is_a_subclass_of_sglangs_hicachestorage_built_by_its_factory(backend):
    assert isinstance(backend, HiCacheStorage)
    assert backend.cfg.interface_v1


def test_v1_round_trips_every_batch_size_from_1_to_128(pool, backend):
    for n in range(1, 129):
        keys = sglang_keys(tokens(n * pool.page_size, start=10_000 * n), pool.page_size)
        want = save_then_scribble(backend, pool, keys, range(n))
        dest = list(range(128, 128 + n))  # other host slots than the ones written from
        assert backend.batch_get_v1(keys, slots(pool, dest)) == [True] * n, n
        assert [page_bytes(pool, p * pool.page_size) for p in dest] == want, n
        assert backend.batch_exists(keys) == n


@pytest.mark.parametrize("make_pool", [
    *(lambda layout=layout, dtype=dtype: MHAHostPool(layout=layout, dtype=dtype, pages=16)
      for layout in ("layer_first", "page_first", "page_first_direct", "page_head")
      for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)),
    *(lambda layout=layout: MLAHostPool(layout=layout, pages=16)
      for layout in ("layer_first", "page_first", "page_first_direct")),
], ids=[f"mha-{l}-{d}" for l in ("layer_first", "page_first", "page_first_direct", "page_head")
        for d in ("bf16", "fp16", "fp32", "fp8")] + [f"mla-{l}" for l in ("layer_first", "page_first", "page_first_direct")])
def test_pages_round_trip_byte_for_byte_through_kvplug_and_hicachefile(make_pool, tmp_path):
    pool = make_pool()
    fill_random(pool, GEN)
    ours = kvplug_backend(pool, mla=isinstance(pool, MLAHostPool), disk_path=str(tmp_path / "kv"))
    ref = file_backend(pool, tmp_path / "file")
    keys = sglang_keys(tokens(6 * pool.page_size), pool.page_size)
    want = [page_bytes(pool, p * pool.page_size) for p in range(6)]
    for i, key in enumerate(keys):
        assert ref.set(key, pool.get_data_page(i * pool.page_size))
    assert ours.batch_set_v1(keys, slots(pool, range(6))) == [True] * 6
    fill_random(pool, GEN)
    assert ours.batch_get_v1(keys, slots(pool, range(8, 14))) == [True] * 6
    got_ours = [page_bytes(pool, p * pool.page_size) for p in range(8, 14)]
    got_ref = [ref.get(k, pool.get_dummy_flat_data_page()).view(torch.uint8).numpy().tobytes() for k in keys]
    assert got_ours == want
    assert got_ref == want
    ours.close()


def test_classic_set_get_round_trip_equals_hicachefile(pool, backend, tmp_path):
    ref = file_backend(pool, tmp_path / "file")
    keys = sglang_keys(tokens(5 * pool.page_size), pool.page_size)
    pages = [pool.get_data_page(p * pool.page_size) for p in range(5)]
    assert backend.batch_set(keys, pages) is True
    assert ref.batch_set(keys, pages) is True
    for key, page in zip(keys, pages):
        ours = backend.get(key, pool.get_dummy_flat_data_page())
        theirs = ref.get(key, pool.get_dummy_flat_data_page())
        assert torch.equal(ours.view(torch.uint8), page.view(torch.uint8))
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    got = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert all(torch.equal(g.view(torch.uint8), p.view(torch.uint8)) for g, p in zip(got, pages))
    no_target = backend.get(keys[0])
    assert no_target.dtype == pool.dtype and torch.equal(no_target.view(torch.uint8), pages[0].view(torch.uint8))


def test_set_and_exists_single_page(pool, backend):
    key = sglang_keys(tokens(pool.page_size, 77), pool.page_size)[0]
    assert not backend.exists(key)
    assert backend.set(key, pool.get_data_page(0))
    assert backend.exists(key)


def test_batch_exists_counts_the_leading_run_of_hits_like_hicachefile(pool, backend, tmp_path):
    ref = file_backend(pool, tmp_path / "file")
    keys = sglang_keys(tokens(6 * pool.page_size), pool.page_size)
    stored = [0, 1, 3, 4]  # page 2 is missing: only the first two count
    for i in stored:
        page = pool.get_data_page(i * pool.page_size)
        assert backend.set(keys[i], page) and ref.set(keys[i], page)
    extra = HiCacheStorageExtraInfo(prefix_keys=[])
    assert backend.batch_exists(keys, extra) == ref.batch_exists(keys, extra) == 2
    assert backend.batch_exists(keys[3:5]) == 2
    assert backend.batch_exists([]) == 0


def test_misses_leave_the_host_pool_untouched(pool, backend):
    keys = sglang_keys(tokens(4 * pool.page_size, 555), pool.page_size)
    before = pool.kv_buffer.clone()
    assert backend.batch_get_v1(keys, slots(pool, range(4))) == [False] * 4
    assert backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys]) == [None] * 4
    assert backend.get(keys[0], pool.get_dummy_flat_data_page()) is None
    assert not backend.exists(keys[0]) and backend.batch_exists(keys) == 0
    assert torch.equal(pool.kv_buffer.view(torch.uint8), before.view(torch.uint8))


def test_a_partial_hit_fills_only_the_pages_that_were_found(pool, backend):
    keys = sglang_keys(tokens(3 * pool.page_size, 999), pool.page_size)
    want = save_then_scribble(backend, pool, keys[:2], [0, 1])
    untouched = page_bytes(pool, 12 * pool.page_size)
    assert backend.batch_get_v1(keys, slots(pool, [10, 11, 12])) == [True, True, False]
    assert [page_bytes(pool, p * pool.page_size) for p in (10, 11)] == want
    assert page_bytes(pool, 12 * pool.page_size) == untouched


def test_clear_removes_every_page_and_returns_true(pool, backend, tmp_path):
    keys = sglang_keys(tokens(4 * pool.page_size), pool.page_size)
    backend.batch_set_v1(keys, slots(pool, range(4)))
    assert backend.clear() is True
    assert backend.batch_exists(keys) == 0
    assert not list((tmp_path / "kv").rglob("*.kvp"))


def test_get_stats_counts_hits_and_returns_sglangs_metrics_or_none(pool, tmp_path):
    b = kvplug_backend(pool, metrics=True, disk_path=str(tmp_path / "kv"))
    keys = sglang_keys(tokens(3 * pool.page_size), pool.page_size)
    b.batch_set_v1(keys, slots(pool, range(3)))
    b.batch_get_v1(keys, slots(pool, range(3, 6)))
    m = b.get_stats()
    counters = b.take_stats() if m is None else m.kvplug
    assert counters["hits"] == 3 and counters["stored"] == 3 and counters["disk_units"] == 3
    if m is not None:  # SGLang's metrics module imports (a full install): its lists are filled
        assert m.prefetch_pgs == [3] and m.backup_pgs == [3]
    b.close()


@pytest.mark.parametrize("make_pool", [lambda: MHAHostPool(pages=8), lambda: MLAHostPool(layout="page_first", pages=8)],
                         ids=["mha-copy-from-flatten", "mla-view-of-pool"])
def test_a_page_being_written_keeps_its_bytes_when_sglang_reuses_the_host_slot(make_pool):
    from kvplug.sglang.keys import page_spec
    from kvplug.sglang.pages import read_page
    pool = make_pool()
    fill_random(pool, GEN)
    payload = read_page(pool, 0, page_spec(pool))
    want = payload.clone()
    fill_random(pool, GEN)  # SGLang reuses the slot while the writer thread still holds the payload
    assert torch.equal(payload, want)
