"""VLLMModelAdapter's two KV paths over a fake vLLM Llama (the attributes the adapter reads, checked
against vLLM 0.32's classes) whose attention backend writes as FlashAttentionImpl does on vLLM
0.32's [B, H, N, 2D] caches (K then V per token and head), by plain indexing. The start-up
self-test must pass on both paths, and on the canonical path must catch a backend that puts K/V
elsewhere than kvplug's layout reads them (blending then turns off, never writes wrong KV).
"""
import pytest
import torch
from torch import nn

from kvplug.blend.paged_cache import OPTIONAL
from kvplug.connector import vllm_compat
from kvplug.connector.model_adapter import VLLMModelAdapter
from kvplug.ops.kv_layout import make_vllm_caches
from kvplug.ops.rope import rerotate_keys_ref, rope_inv_freq

L, KV, H, D, BS, NB = 2, 2, 4, 16, 16, 6


class FlashLikeImpl:
    sliding_window, logits_soft_cap, alibi_slopes, kv_cache_dtype = None, 0, None, "auto"

    def __init__(self, swap=False):
        self.swap = swap  # a backend whose K/V sit where kvplug does not look

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        b, n = slot_mapping // BS, slot_mapping % BS
        k, v = (value, key) if self.swap else (key, value)
        kv_cache[b, :, n, :D], kv_cache[b, :, n, D:] = k, v


class CPUAttentionBackendImpl(FlashLikeImpl):
    pass


class RotaryEmbedding:
    rotary_dim, base, is_neox_style = D, 10000.0, True

    def _compute_inv_freq(self, base):
        return rope_inv_freq(D, base)


class Attn(nn.Module):
    def __init__(self, i, impl):
        super().__init__()
        self.impl, self.layer_name = impl, f"layer.{i}"


class SelfAttn(nn.Module):
    def __init__(self, i, impl):
        super().__init__()
        self.attn, self.rotary_emb = Attn(i, impl), RotaryEmbedding()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scaling = H, KV, D, D ** -0.5


class Layer(nn.Module):
    """(positions, hidden, residual) -> (hidden, residual), calling self_attn.attn(q, k, v) with
    q and k rotated at the positions, as vLLM's Llama layer does (the self-test runs it)."""

    def __init__(self, i, impl):
        super().__init__()
        self.self_attn = SelfAttn(i, impl)
        self.q, self.k, self.v = nn.Linear(H * D, H * D), nn.Linear(H * D, KV * D), nn.Linear(H * D, KV * D)

    def forward(self, positions, hidden_states, residual):
        x = hidden_states if residual is None else hidden_states + residual
        zero, inv_freq = torch.zeros_like(positions), rope_inv_freq(D, RotaryEmbedding.base)
        q = rerotate_keys_ref(self.q(x).view(-1, H, D), zero, positions, inv_freq).reshape(-1, H * D)
        k = rerotate_keys_ref(self.k(x).view(-1, KV, D), zero, positions, inv_freq).reshape(-1, KV * D)
        return self.self_attn.attn(q, k, self.v(x)), x


class Inner(nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.layers = nn.ModuleList([Layer(i, impl) for i in range(L)])
        self.embed_tokens = nn.Embedding(10, H * D)


class LlamaForCausalLM(nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.model = Inner(impl)


def adapter(kv_io, impl=None, layout="LBNHC"):
    g = torch.Generator().manual_seed(0)
    caches = make_vllm_caches(L, NB, BS, KV, D, torch.float32, "cpu", layout, generator=g)
    return VLLMModelAdapter(LlamaForCausalLM(impl or FlashLikeImpl()), {f"layer.{i}": c for i, c in enumerate(caches)},
                            BS, kv_io=kv_io)


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
def test_the_canonical_path_passes_the_self_test_with_all_layer_methods(layout):
    m = adapter("canonical", layout=layout)
    assert m.kv_io == "canonical" and m._reader is None and all(callable(getattr(m, n)) for n in OPTIONAL)
    assert vllm_compat.self_test(m) is None
    k, v = torch.randn(5, KV, D), torch.randn(5, KV, D)
    slots = torch.tensor([3, 40, 17, 90, 64])
    m.backend_write(1, k, v, slots)
    kv = m.read_kv_layers(slots, first_layer=1)
    assert torch.equal(kv[0, 0], k) and torch.equal(kv[0, 1], v)


def test_the_canonical_self_test_catches_a_backend_that_writes_elsewhere():
    why = vllm_compat.self_test(adapter("canonical", FlashLikeImpl(swap=True)))
    assert why is not None and "do_kv_cache_update" in why


def test_the_opaque_path_probes_the_backend_and_reads_every_layer_with_one_index():
    m = adapter("opaque")
    assert m._reader is not None and all(getattr(m, n, None) is None for n in OPTIONAL if n != "read_kv_layers")
    assert vllm_compat.self_test(m) is None
    g = torch.Generator().manual_seed(3)
    slots = torch.tensor([5, 0, 17, 3, 30])  # out of order, across blocks
    for i in range(L):
        k = torch.randn(slots.numel(), KV, D, generator=g)
        m.write_kv(i, k, k * 2 + 1, slots)
    every = m.read_kv_layers(slots)
    for i in range(L):
        k, v = m.read_kv(i, slots)
        assert torch.equal(every[i, 0], k) and torch.equal(every[i, 1], v) and torch.equal(v, k * 2 + 1)
    # The probe learns whatever the backend does: swapped K/V read back as written.
    assert vllm_compat.self_test(adapter("opaque", FlashLikeImpl(swap=True))) is None


def test_canonical_is_refused_on_the_cpu_backend_and_unknown_paths_are_rejected():
    impl = CPUAttentionBackendImpl()
    model = LlamaForCausalLM(impl)
    for layer in model.model.layers:
        layer.self_attn.attn.isa = "vec"
    caches = {f"layer.{i}": c for i, c in enumerate(make_vllm_caches(L, NB, BS, KV, D, torch.float32, "cpu"))}
    with pytest.raises(ValueError, match="ISA-packed"):
        VLLMModelAdapter(model, caches, BS, kv_io="canonical")
    with pytest.raises(ValueError, match="allowed values are opaque, canonical"):
        adapter("fast")


def test_keys_rotated_otherwise_than_the_rope_module_says_fail_the_self_test():
    """A layer whose keys turn with another base than its rotary_emb reports (a RoPE kvplug reads
    wrong) would be re-rotated wrong: the start-up check names the layer, blending stays off."""
    m = adapter("opaque")
    m._ropes[1] = (rope_inv_freq(D, 500.0), "neox")
    why = vllm_compat.self_test(m)
    assert why is not None and why.startswith("layer 1's keys do not re-rotate with its RoPE")


def test_linear_rope_scaling_divides_the_frequencies_and_several_factors_are_refused():
    class LinearScalingRotaryEmbedding(RotaryEmbedding):
        scaling_factors = [4.0]

    inv_freq, style = vllm_compat.rope_frequencies(LinearScalingRotaryEmbedding())
    torch.testing.assert_close(inv_freq, rope_inv_freq(D, 10000.0, {"rope_type": "linear", "factor": 4.0}))
    assert style == "neox"
    lora = LinearScalingRotaryEmbedding()
    lora.scaling_factors = [1.0, 4.0]
    with pytest.raises(ValueError, match="one linear RoPE scaling factor"):
        vllm_compat.rope_frequencies(lora)


def test_an_untested_family_off_the_cpu_backend_is_refused_by_name():
    """A family outside vllm_compat.TESTED_FAMILIES is accepted only after its layers match vLLM's
    own forward, which needs the engine's CPU kernel: elsewhere it is refused, named, at start-up."""
    model = type("Phi3ForCausalLM", (LlamaForCausalLM,), {})(FlashLikeImpl())
    caches = make_vllm_caches(L, NB, BS, KV, D, torch.float32, "cpu", "LBNHC")
    with pytest.raises(ValueError, match=r"blend does not support Phi3ForCausalLM: it is not among the tested "
                                         r"families \(.*Gemma3ForCausalLM\) and its layers can be checked against "
                                         r"vLLM's own forward on the CPU backend only"):
        VLLMModelAdapter(model, {f"layer.{i}": c for i, c in enumerate(caches)}, BS, kv_io="canonical")
