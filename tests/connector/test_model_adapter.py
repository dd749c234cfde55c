"""VLLMModelAdapter's start-up refusals, on stand-in modules (no engine): a family or a layer
kind the blender cannot run is refused with a one-line message naming it, before any cache is
touched. (That the tested families run right is checked end to end against transformers in
tests/e2e/test_blend_e2e.py; that other families are accepted only after vllm_compat.check_layers
and refused by name otherwise, there too.)"""
import pytest
from torch import nn

from kvplug.connector.model_adapter import VLLMModelAdapter


def stand_in(arch: str, layer: nn.Module) -> nn.Module:
    model = type(arch, (nn.Module,), {})()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer])
    model.model.embed_tokens = nn.Embedding(4, 4)
    return model


def attention_layer(**impl_attrs) -> nn.Module:
    layer, self_attn, attn = nn.Module(), nn.Module(), nn.Module()
    attn.impl = type("Impl", (), impl_attrs)()
    attn.layer_name = "model.layers.0.self_attn.attn"
    self_attn.attn, self_attn.rotary_emb = attn, nn.Module()
    self_attn.num_heads, self_attn.num_kv_heads, self_attn.head_dim, self_attn.scaling = 2, 1, 4, 0.5
    layer.self_attn = self_attn
    return layer


def test_a_family_without_vllms_layer_parts_is_refused_naming_it():
    with pytest.raises(ValueError, match="blend cannot run OlmoForCausalLM: layer 0's self_attn lacks attn") as e:
        VLLMModelAdapter(stand_in("OlmoForCausalLM", nn.Module()), {}, 128)
    assert "\n" not in str(e.value)
    model = stand_in("TransformersForCausalLM", nn.Module())
    model.config = type("Config", (), {"architectures": ["Olmo2ForCausalLM"]})()
    with pytest.raises(ValueError, match=r"Olmo2ForCausalLM \(vLLM's TransformersForCausalLM\)"):
        VLLMModelAdapter(model, {}, 128)


@pytest.mark.parametrize("impl, what", [({"logits_soft_cap": 50.0}, "soft-capped attention logits"),
                                        ({"sinks": object()}, "attention sinks"),
                                        ({"alibi_slopes": object()}, "ALiBi")])
def test_soft_caps_sinks_and_alibi_are_refused_naming_the_family(impl, what):
    with pytest.raises(ValueError, match=rf"blend does not support {what} \(Gemma2ForCausalLM, "
                                         r"model.layers.0.self_attn.attn; set blend=false\)"):
        VLLMModelAdapter(stand_in("Gemma2ForCausalLM", attention_layer(**impl)), {}, 128)


def test_mistral_layers_conditioned_on_t_cond_are_refused_naming_it():
    layer = nn.Module()
    layer.ada_rms_norm_t_cond = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"MistralForCausalLM layers conditioned on t_cond \(ada_rms_norm_t_cond\)"):
        VLLMModelAdapter(stand_in("MistralForCausalLM", layer), {}, 128)
