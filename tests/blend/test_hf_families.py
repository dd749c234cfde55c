"""The blender over transformers' own modules (HFModelAdapter), per model family, against
transformers' own forward, in float32 and without vLLM.

Tiny random-weight models (tests/tiny_model.py): Qwen3 (q/k norms), Gemma 3 (a 32-token sliding
window on layers 0 and 2 with RoPE base 1e4, a global layer 1 with base 1e6 and linear scaling x4,
scaled embeddings, query_pre_attn_scalar), Llama with Llama 3 RoPE scaling and with linear scaling.
The prompt is longer than Gemma's window and its chunks are re-ordered, so positions beyond a
window and each layer's own RoPE are exercised. Oracles: transformers' full prefill of the prompt
(ratio 1.0 must equal it) and each chunk's KV from transformers' prefill of the chunk alone, keys
re-rotated with the RoPE computed from the config (kvplug.ops.rope.rope_inv_freq, not the
adapter's), concatenated (ratio 0 must equal it)."""
import sys
from pathlib import Path

import pytest
import torch

from kvplug.blend.blender import BlendJob, Blender
from kvplug.blend.hf_adapter import HFModelAdapter
from kvplug.ops.rope import rerotate_keys_ref, rope_inv_freq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_model import tiny_model_path  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
FAMILIES = {
    "qwen3": {"family": "qwen3"},
    "gemma3": {"family": "gemma3"},
    "llama3_rope": {"rope_scaling": LLAMA3},
    "linear_rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
}
SIZES = (37, 45, 29, 41)  # chunks longer than Gemma's 32-token window; 152 tokens in all


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_path(tmp_path_factory.getbasetemp() / "tiny", **FAMILIES[request.param])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, model


def hf_kv(model, tokens) -> torch.Tensor:
    """transformers' prefill of tokens from position 0: [L, 2, T, KV, D] (every layer in full)."""
    from transformers import DynamicCache

    with torch.no_grad():
        past = model(torch.tensor([tokens]), use_cache=True, past_key_values=DynamicCache()).past_key_values
    return torch.stack([torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)])
                        for layer in past.layers])


def config_ropes(model) -> list[torch.Tensor]:
    """Each layer's inv_freq from the config alone."""
    cfg = model.config
    head_dim = cfg.head_dim
    params = cfg.rope_parameters
    if "full_attention" in params:  # Gemma 3: per layer type
        return [rope_inv_freq(head_dim, params[t]["rope_theta"], params[t]) for t in cfg.layer_types]
    return [rope_inv_freq(head_dim, params["rope_theta"], params)] * cfg.num_hidden_layers


def prompt(order):
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in SIZES]
    tokens, chunks = [], []
    for c in order:
        chunks.append((len(tokens), len(tokens) + SIZES[c], bytes([c]) * 32))
        tokens += docs[c]
    return tokens + [7, 8, 9, 10], chunks, len(tokens)


def blend(model, ratio, policy="fixed"):
    tokens, chunks, end = prompt((2, 0, 3, 1))
    store = {key: hf_kv(model, tokens[b:e]) for b, e, key in chunks}  # computed alone, at 0..n-1
    m = HFModelAdapter(model, end)
    report = Blender(m, check_layer=1, head_tokens=2).run(
        BlendJob(tokens, 0, end, chunks, torch.arange(end), ratio, policy, tail=tokens[end:], chunk_kv=store))
    return m, report, tokens, chunks, end, store


def test_the_adapter_reads_each_layers_rope_and_window_from_the_model(family):
    name, model = family
    m = HFModelAdapter(model, 8)
    for i, inv_freq in enumerate(config_ropes(model)):
        torch.testing.assert_close(m.rope_for(i)[0], inv_freq)
    want = [32, None, 32] if name == "gemma3" else [None] * model.config.num_hidden_layers
    assert [m.window(i) for i in range(m.num_layers)] == want


def test_ratio_one_equals_transformers_full_prefill(family):
    _, model = family
    m, report, tokens, _, end, _ = blend(model, 1.0)
    want = hf_kv(model, tokens[:end])
    assert report.recomputed == end
    torch.testing.assert_close(m.kv[:, :, :end], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_ratio_zero_equals_the_chunks_rerotated_with_each_layers_rope(family):
    _, model = family
    m, report, tokens, chunks, end, store = blend(model, 0.0)
    ropes = config_ropes(model)
    pieces = []
    for b, e, key in chunks:
        kv = store[key].clone()
        for i, inv_freq in enumerate(ropes):
            kv[i, 0] = rerotate_keys_ref(kv[i, 0], torch.arange(e - b), torch.arange(b, e), inv_freq, "neox")
        pieces.append(kv)
    concat = torch.cat(pieces, 2)
    assert report.recomputed == 0
    scale = float(concat.abs().max())
    torch.testing.assert_close(m.kv[:, :, :end], concat, rtol=1e-4, atol=1e-4 * scale)
    assert float((concat - hf_kv(model, tokens[:end])).abs().max()) > 1e-2 * scale  # an approximation


def test_a_partial_ratio_recomputes_its_budget_of_picked_tokens(family):
    _, model = family
    _, report, _, _, end, _ = blend(model, 0.25, policy="mixed")
    assert report.recomputed == round(0.25 * end) and len(set(report.picked)) == report.recomputed
