"""Checks blended KV tensor by tensor, in one process (engine core and worker in-process).

    python blend_kv_driver.py MODEL OUT.json

MODEL is any folder vLLM and transformers both load (the tests run one per model family the
blender's vLLM adapter supports: tests/tiny_model.py FAMILIES); nothing here depends on the family.

After one request has put its chunks in the store, the blender is run again on the same chunks
in a new order with its cache writes captured, at recompute_ratio 1.0 and 0. The references are
computed by Hugging Face transformers, not by kvplug: the full prefill of the new prompt; and the
full prefill of the first prompt (where the chunks were stored from), cut into its chunks, keys
re-rotated to their new positions (kvplug.ops.rerotate_keys_ref) and concatenated in the new
order, each layer with the RoPE its config gives it (Gemma 3: per layer type, with its scaling).
OUT: max abs differences per case, the KV scale, and which classes ran (vLLM's decoder layer,
transformers' model) with the largest q/k/v bias of vLLM's layer 0 (0 for families without one),
the sliding windows the blender saw per layer and the prompt's length, and what
vllm_compat.check_layers (the start-up comparison with vLLM's own forward) says of the adapter as
it is, with a wrong attention scale, and with a wrong sliding window on layer 0.
"""
import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
SEP = " # # "


def main(model_path: str, out_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from kvplug.blend.blender import BlendJob
    from kvplug.connector.vllm_compat import TESTED_FAMILIES, check_layers
    from kvplug.core.chunking import chunk_key, chunk_spans
    from kvplug.ops.rope import rerotate_keys_ref, rope_inv_freq

    from transformers import DynamicCache

    docs = [" ".join(f"fact{(s * 31 + i * 17) % 97} about topic {s} is value{(s * i) % 89}" for i in range(16))
            for s in (1, 2, 3)]
    first = SEP.join(["Documents follow."] + docs + ["question one?"])
    second = SEP.join(["Documents follow.", docs[2], docs[0], docs[1], "question two?"])
    llm = LLM(model=model_path, enforce_eager=True, max_model_len=2048, dtype="float32", seed=0,
              kv_transfer_config={"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                  "kv_connector_extra_config": {"cpu_bytes": 1e8, "blend": True,
                                                                "blend_min_chunk_tokens": 8}})
    llm.generate([first], SamplingParams(max_tokens=1), use_tqdm=False)
    conn = get_kv_transfer_group()
    blender, facts = conn._worker.blender, conn.facts

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(second).input_ids
    sep = tuple(tok(SEP, add_special_tokens=False).input_ids[1:-1])
    spans = chunk_spans(ids, sep)
    end = spans[-1][1]
    chunks = [(b, e, chunk_key(facts.namespace, ids[b:e], None)) for b, e in spans]
    worker = conn._worker
    chunk_kv = {}
    for _, _, key in chunks:  # the first request saved them from the paged cache into the CPU tier
        unit = worker.rows._units.get(key)
        if unit is not None:
            chunk_kv[key] = blender.fmt.kv(worker.rows.read(key, unit[0]).payload)

    captured = {}
    write = blender.m.write_kv

    def capture(i, k, v, slots):  # the last write of each layer is what the cache keeps
        captured[i] = torch.stack([k.clone(), v.clone()])
        write(i, k, v, slots)

    blender.m.write_kv = capture
    # Blocks 1.. of the engine's cache (block 0 is vLLM's null block): the engine is idle and
    # serves nothing after this, so the blender may use them as the request's blocks.
    bs = facts.block_size
    table = torch.arange(1, (end + bs - 1) // bs + 1)
    slots = table[torch.arange(end) // bs] * bs + torch.arange(end) % bs
    results = {}
    for ratio in (1.0, 0.0):
        captured.clear()
        job = BlendJob(ids, 0, end, chunks, slots, ratio, block_table=table, chunk_kv=chunk_kv)
        report = blender.run(job)
        results[ratio] = (torch.stack([captured[i] for i in range(len(captured))]), report)

    hf = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        def hf_kv(tokens):  # [L, 2, T, KV, D]
            # a DynamicCache of full layers: by default a sliding-window layer keeps only its window
            past = hf(torch.tensor([tokens]), use_cache=True, past_key_values=DynamicCache()).past_key_values
            layers = [(past.layers[i].keys, past.layers[i].values) if hasattr(past, "layers") else past[i]
                      for i in range(hf.config.num_hidden_layers)]
            return torch.stack([torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)]) for k, v in layers])
        full = hf_kv(ids[:end])
        first_ids = tok(first).input_ids
        first_kv = hf_kv(first_ids)
        where = {tuple(first_ids[b:e]): b for b, e in chunk_spans(first_ids, sep)}
        ropes = config_ropes(hf.config, rope_inv_freq)
        pieces = []
        for b, e in spans:
            at = where[tuple(ids[b:e])]  # the chunk's position in the first prompt
            kv = first_kv[:, :, at:at + e - b].clone()
            for i, inv_freq in enumerate(ropes):
                kv[i, 0] = rerotate_keys_ref(kv[i, 0], torch.arange(at, at + e - b), torch.arange(b, e), inv_freq)
            pieces.append(kv)
        concat = torch.cat(pieces, dim=2)
    blended_full, r1 = results[1.0]
    blended_zero, r0 = results[0.0]
    qkv = getattr(blender.m.layers[0].self_attn, "qkv_proj", None)
    bias = getattr(qkv, "bias", None)
    m = blender.m
    checks = {"as_is": check_layers(m, own_forward=True)}
    m.scale, scale = m.scale * 1.5, m.scale
    checks["wrong_scale"] = check_layers(m, own_forward=True)
    m.scale, windows = scale, list(m._windows)
    m._windows[0] = 2  # the check runs 5 tokens: a 2-token window changes layer 0's output
    checks["wrong_window"] = check_layers(m, own_forward=True)
    m._windows[:] = windows
    out = {
        "check_layers": checks,
        "vllm_layer": type(blender.m.layers[0]).__name__, "hf_model": type(hf).__name__,
        "qkv_bias_max": float(bias.abs().max()) if bias is not None else 0.0,
        "tokens": end, "chunks": len(spans), "store_hits": len(chunk_kv),
        "ratio1_recomputed": r1.recomputed, "ratio0_recomputed": r0.recomputed,
        "ratio1_vs_full_prefill": float((blended_full - full).abs().max()),
        "ratio0_vs_concat": float((blended_zero - concat).abs().max()),
        "ratio0_vs_full_prefill": float((blended_zero - full).abs().max()),
        "kv_scale": float(full.abs().max()),
        "windows": [blender.m.window(i) for i in range(blender.m.num_layers)],
        "tested_family": blender.m.arch in TESTED_FAMILIES,  # else accepted through check_layers
    }
    with open(out_path, "w") as f:
        json.dump(out, f)


def config_ropes(cfg, rope_inv_freq):
    """Each layer's inv_freq from the HF config alone (not from kvplug's adapter)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    params = cfg.rope_parameters
    if "full_attention" in params:  # Gemma 3: per layer type
        return [rope_inv_freq(head_dim, params[t]["rope_theta"], params[t]) for t in cfg.layer_types]
    rotary = int(head_dim * params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)))
    return [rope_inv_freq(rotary, params["rope_theta"], params)] * cfg.num_hidden_layers


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
