"""Layout tags name everything a page's bytes depend on; unit keys separate namespaces, layouts
and SGLang keys without ambiguity. Plain kvplug: no sglang needed."""
import hashlib
from types import SimpleNamespace

import pytest
import torch

from kvplug.sglang.keys import KEY_TAG, layout_tag, page_spec, unit_key, unit_layout
from sglang_host_pool import MHAHostPool, MLAHostPool


def storage(**over):
    base = dict(tp_rank=0, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                is_mla_model=False, model_name="m", should_split_heads=False)
    return SimpleNamespace(**{**base, **over})


@pytest.mark.parametrize("pool_change, storage_change", [
    ({"layout": "layer_first"}, {}), ({"dtype": torch.float16}, {}), ({"page_size": 8}, {}),
    ({"layers": 3}, {}), ({"heads": 4}, {}), ({"head_dim": 16}, {}),
    ({}, {"tp_rank": 1}), ({}, {"tp_size": 4}), ({}, {"pp_rank": 1, "pp_size": 2}),
    ({}, {"attn_cp_rank": 1, "attn_cp_size": 2}), ({}, {"model_name": "other"}),
])
def test_every_byte_shaping_property_changes_the_layout_tag(pool_change, storage_change):
    base = layout_tag(MHAHostPool(pages=4), storage())
    assert layout_tag(MHAHostPool(pages=4, **pool_change), storage(**storage_change)) != base


def test_pool_size_does_not_change_the_tag_so_engines_with_other_pool_sizes_share():
    assert layout_tag(MHAHostPool(pages=4), storage()) == layout_tag(MHAHostPool(pages=64), storage())


def test_mla_tags_leave_the_tp_rank_out():
    a = layout_tag(MLAHostPool(pages=4), storage(is_mla_model=True, tp_rank=0))
    b = layout_tag(MLAHostPool(pages=4), storage(is_mla_model=True, tp_rank=1))
    assert a == b and "tp=" not in a


def test_model_id_overrides_the_model_name():
    assert layout_tag(MHAHostPool(pages=4), storage(model_name="/a/path"), model_id="llama") == \
        layout_tag(MHAHostPool(pages=4), storage(model_name="/b/path"), model_id="llama")


def test_head_splitting_is_refused():
    with pytest.raises(ValueError, match="tp_lcm_size"):
        layout_tag(MHAHostPool(pages=4), storage(should_split_heads=True))


def test_page_spec_is_the_flat_page_of_the_pool():
    pool = MHAHostPool(layers=3, heads=2, head_dim=8, page_size=4, pages=4, dtype=torch.float16)
    spec = page_spec(pool)
    assert (spec.dtype, spec.numel, spec.nbytes) == (torch.float16, 2 * 3 * 4 * 2 * 8, 2 * 3 * 4 * 2 * 8 * 2)


def test_unit_key_is_sha256_of_length_prefixed_parts():
    parts = [p.encode() for p in ("ns", "layout", "ab" * 32)]
    h = hashlib.sha256(KEY_TAG)
    for p in parts:
        h.update(len(p).to_bytes(8, "little") + p)
    assert unit_key("ns", "layout", "ab" * 32) == h.digest()


def test_unit_keys_differ_when_parts_shift_between_fields():
    assert unit_key("a", "bc", "k") != unit_key("ab", "c", "k")
    assert unit_key("", "l", "k") != unit_key("x", "l", "k")
    assert len(unit_key("", "l", "k")) == 32


@pytest.mark.parametrize("bad", ["", None, 5, b"ab"])
def test_unit_key_refuses_non_string_keys(bad):
    with pytest.raises(ValueError):
        unit_key("", "l", bad)


def test_unit_layout_quotes_the_namespace():
    assert unit_layout("L", 'a;b"') != unit_layout("L", "a") and unit_layout("L", "").endswith('namespace=""')
