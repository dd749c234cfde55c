"""VLLMModelAdapter's start-up refusals, on stand-in modules (no engine): a family or a layer
kind the blender cannot run is refused with a message naming it, before any cache is touched.
(That the supported families run right is checked end to end against transformers in
tests/e2e/test_blend_e2e.py.)"""
import pytest
from torch import nn

from kvplug.connector.model_adapter import VLLMModelAdapter


def stand_in(arch: str, layer: nn.Module) -> nn.Module:
    model = type(arch, (nn.Module,), {})()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer])
    return model


def test_unknown_family_is_refused_naming_it():
    with pytest.raises(ValueError, match="this model is GemmaForCausalLM"):
        VLLMModelAdapter(stand_in("GemmaForCausalLM", nn.Module()), {}, 128)


def test_mistral_layers_conditioned_on_t_cond_are_refused_naming_it():
    layer = nn.Module()
    layer.ada_rms_norm_t_cond = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"MistralForCausalLM layers conditioned on t_cond \(ada_rms_norm_t_cond\)"):
        VLLMModelAdapter(stand_in("MistralForCausalLM", layer), {}, 128)
