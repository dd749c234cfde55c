"""Smoke tests for the tiny test model (tests/tiny_model.py).

Fast tests (no vLLM): it builds byte-identically, its tokenizer round-trips
ASCII, and the transformers forward is deterministic and prompt-dependent.
The e2e test starts vLLM (CPU) on it in subprocesses - pytest imports this
module, and vLLM's engine core uses spawn, so the engine must not start here.
"""
from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_model import FAMILIES, make_tiny_llama, make_tiny_model, tiny_model_path

PROMPTS = ["The capital of France is", "Hello world", "def add(a, b):",
           "The quick brown fox jumps over"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_path(tmp_path_factory.mktemp("tiny"))


def test_tiny_model_builds(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_dir / name).is_file(), name
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["head_dim"] == 64  # vLLM CPU attention rejects 16 (= 64 hidden / 4 heads)
    tok = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert cfg["vocab_size"] == len(tok["model"]["vocab"]) == 512
    assert tiny_model_path(tiny_dir.parent) == tiny_dir  # second call reuses the folder


def test_build_is_byte_deterministic(tmp_path, tiny_dir):
    again = make_tiny_llama(tmp_path / "again")
    names = sorted(p.name for p in again.iterdir())
    assert "model.safetensors" in names
    for name in names:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    other = make_tiny_llama(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_tokenizer_round_trips_ascii(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rng = random.Random(0)
    alphabet = "".join(chr(c) for c in range(128))  # all of ASCII, controls included
    texts = ["", " ", "  leading and trailing  ", "The capital of France is",
             "a .b , c ! d ?", "tabs\tand\nnewlines\r\n", string.printable]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(200)]
    for text in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text, repr(text)
    assert tok("Hello")["input_ids"] == tok.encode("Hello", add_special_tokens=False)  # no BOS


def test_forward_is_deterministic_and_prompt_dependent(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    runs = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        ids = tok(PROMPTS[0], return_tensors="pt").input_ids
        with torch.no_grad():
            runs.append(model(ids).logits)
    assert torch.equal(runs[0], runs[1])
    conts = set()
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
            conts.add(tuple(out[0, ids.shape[1]:].tolist()))
    assert len(conts) == len(PROMPTS)  # random weights, yet not degenerate
    logits = runs[0][0, -1]
    assert logits.std() > 1.0  # peaked enough that greedy is robust to rounding


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_family_builds_deterministically_with_what_vllm_and_the_blender_need(tmp_path, family):
    """Mistral with full attention, Qwen2 with non-zero q/k/v biases and head_dim = hidden/heads
    (what vLLM's Qwen2 attention assumes), Qwen3/Gemma 3 with q/k norm weights that are not all
    one, Gemma 3 with a 32-token window on its sliding layers and a global layer with its own
    (linearly scaled) RoPE; same bytes twice; transformers loads and runs it."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = tiny_model_path(tmp_path, family=family)
    assert path.name.startswith(f"tiny-{family}-")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [FAMILIES[family][1]]
    assert cfg.get("sliding_window") == (32 if family.startswith("gemma") else None)
    if family == "gemma3":
        assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
        assert cfg["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
    assert (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) == 64  # a CPU head size
    if family == "qwen2":
        assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # vLLM's Qwen2 ignores config.head_dim
    again = make_tiny_model(tmp_path / "again", family=family)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (path / name).read_bytes(), name
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        biases = [k for k in f.keys() if k.endswith("_proj.bias")]
        if family == "qwen2":
            assert sorted({k.rsplit(".", 2)[-2] for k in biases}) == ["k_proj", "q_proj", "v_proj"]
            assert all(f.get_tensor(k).abs().max() > 0.5 for k in biases)
        else:
            assert biases == []
        norms = [k for k in f.keys() if k.endswith(("q_norm.weight", "k_norm.weight"))]
        assert len(norms) == (2 * cfg["num_hidden_layers"] if family in ("qwen3", "gemma3") else 0)
        assert all(f.get_tensor(k).std() > 0.2 for k in norms)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == FAMILIES[family][1]
    with torch.no_grad():
        assert model(torch.tensor([[5, 6, 7]])).logits[0, -1].std() > 1.0


def test_qwen2_head_dim_other_than_hidden_over_heads_is_refused(tmp_path):
    with pytest.raises(ValueError, match="qwen2: vLLM uses hidden/heads as head_dim"):
        make_tiny_model(tmp_path / "q", family="qwen2", hidden=64)


_ENGINE_SCRIPT = r"""
import json, sys, time
if __name__ == "__main__":
    path, dtype, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    llm = LLM(model=path, dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0)
    start_s = time.perf_counter() - t0
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    print("KVPLUG_RESULT " + json.dumps({"start_s": start_s,
          "tokens": [list(o.outputs[0].token_ids) for o in outs]}), flush=True)
"""


def _run_engine(path: Path, dtype: str) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)  # set by conftest for kernel tests; not for vLLM
    proc = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, str(path), dtype,
                           json.dumps(PROMPTS)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KVPLUG_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].split(" ", 1)[1])


@pytest.mark.e2e
def test_vllm_greedy_is_deterministic(tiny_dir, record_property):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    first = _run_engine(tiny_dir, "float32")
    second = _run_engine(tiny_dir, "float32")
    record_property("engine_start_s", [round(first["start_s"], 1), round(second["start_s"], 1)])
    print(f"vLLM engine start: {first['start_s']:.1f}s, {second['start_s']:.1f}s; "
          f"two runs in {time.perf_counter() - t0:.1f}s")
    assert first["tokens"] == second["tokens"]
    # fp32 vLLM should follow the fp32 transformers reference: catches a wrong weight
    # mapping or RoPE config, which determinism alone would not.
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for prompt, got in zip(PROMPTS, first["tokens"]):
            ids = tok(prompt, return_tensors="pt").input_ids
            ref = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
            assert got[:8] == ref.tolist(), prompt
