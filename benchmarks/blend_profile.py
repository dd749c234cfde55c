"""Where a blend's time goes: one vLLM engine in this process, cProfile around each blended request.

    python benchmarks/blend_profile.py [--model PATH] [--dtype float32] [--docs 6] [--doc-tokens 512]
                                       [--requests 4] [--batch 1] [--policy query] [--ratio 0.15]
                                       [--json PATH] [--label NAME]

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so cProfile sees kvplug's
worker. --docs documents are stored as chunks by one warm-up request; each measured request (or
each group of --batch requests sent together) puts them in a new order after the same system
prompt, so nothing but the system prompt is a prefix hit and every chunk is blended; requests carry
`"save": false` (no prefix blocks saved) and the engine runs with `blend_cost_gate: false` (every
request blends, whatever it costs). A plain prefill of the same prompt (`"blend": false`) gives
the per-token prefill cost beside it. Per stage (a function of kvplug, by name, so the same table
reads an older checkout: stages it lacks show "-") the seconds summed over the measured requests
(cumulative, so nested stages overlap: see the notes), per blended request and per recomputed token.

The JSON (--json) holds the table, the counters and the prefill figures, under `label`.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import random
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

SEP = " # # "
SYSTEM = "You answer questions about the documents below."
QUESTION = "What is the main argument of the documents above?"
# (label, file suffix, function): kvplug's functions in the blend path, old and new names.
STAGES = [
    ("worker load (the whole step's kvplug work)", "connector/worker.py", "load"),
    ("  fetch chunks from rows (read_rows)", "connector/loads.py", "read_rows"),
    ("  blend batch (run_batch) / blend (run)", "blend/blender.py", "run_batch"),
    ("  blend batch (run_batch) / blend (run)", "blend/blender.py", "run"),
    ("    gather chunk KV (_gather)", "blend/blender.py", "_gather"),
    ("    re-rotate keys (rerotate_keys)", "ops/rope.py", "rerotate_keys"),
    ("    read the engine's prefix (_with_prefix)", "blend/blender.py", "_with_prefix"),
    ("    relevance pass (question_passes / question_pass)", "blend/relevance.py", "question_passes"),
    ("    relevance pass (question_passes / question_pass)", "blend/relevance.py", "question_pass"),
    ("    recompute through the layers (_recompute)", "blend/blender.py", "_recompute"),
    ("      decoder layers (forward_layer)", "connector/model_adapter.py", "forward_layer"),
    ("      paged attention (CPU kernel)", "connector/vllm_compat.py", "cpu_paged_attention"),
    ("      paged plan (metadata)", "connector/vllm_compat.py", "cpu_paged_metadata"),
    ("      cache writes (do_kv_cache_update)", "connector/vllm_compat.py", "kv_write"),
    ("    selection (_select)", "blend/blender.py", "_select"),
    ("worker save: chunk saves (_save_chunks)", "connector/worker.py", "_save_chunks"),
]


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    out: dict[str, float] = {}
    for (path, _, func), (_, _, _, cum, _) in stats.stats.items():
        for label, suffix, name in STAGES:
            if func == name and path.endswith(suffix):
                out[label] = out.get(label, 0.0) + cum
    return out


def make_docs(tok, n: int, tokens: int, seed: int) -> list[str]:
    from workloads.text import load_corpus, make_documents

    return make_documents(n, tokens, seed, lambda s: tok.encode(s, add_special_tokens=False), load_corpus())


def run(args) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from models import resolve_model

    model = resolve_model(args.model, args.data_dir)
    tok = AutoTokenizer.from_pretrained(model)
    docs = make_docs(tok, args.docs, args.doc_tokens, args.seed)
    extra = {"cpu_bytes": 2e9, "blend": True, "recompute_policy": args.policy, "recompute_ratio": args.ratio}
    from kvplug.config import BLEND_USER_KEYS  # an older checkout (the "before" column) lacks these keys

    extra.update({k: v for k, v in (("blend_cost_gate", False), ("blend_audit_rate", 0.0)) if k in BLEND_USER_KEYS})
    llm = LLM(model=model, enforce_eager=True, max_model_len=8192, dtype=args.dtype, seed=0, enable_prefix_caching=True,
              disable_log_stats=False, kv_transfer_config={"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                                           "kv_connector_extra_config": extra})
    one = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([SEP.join([SYSTEM, *docs, QUESTION])], one, use_tqdm=False)  # stores every document as a chunk
    rng = random.Random(args.seed)

    def prompt(i: int) -> str:
        order = docs[:]
        rng.shuffle(order)
        return SEP.join([SYSTEM, *order, f"{QUESTION} ({i})"])
    blend = SamplingParams(temperature=0, max_tokens=1, extra_args={"kv_transfer_params": {"save": False}})
    plain = SamplingParams(temperature=0, max_tokens=1, extra_args={"kv_transfer_params": {"blend": False,
                                                                                           "save": False}})
    llm.reset_prefix_cache()
    llm.generate([prompt(-1)], blend, use_tqdm=False)  # warm-up blend: lazy set-up outside the profile
    llm.reset_prefix_cache()
    t = time.perf_counter()
    out = llm.generate([prompt(-2)], plain, use_tqdm=False)[0]
    prefill_s, prompt_tokens = time.perf_counter() - t, len(out.prompt_token_ids)
    before = _counters(llm)
    prof, walls = cProfile.Profile(), []
    for i in range(0, args.requests, args.batch):
        llm.reset_prefix_cache()
        prompts = [prompt(i + j) for j in range(min(args.batch, args.requests - i))]
        t = time.perf_counter()
        prof.enable()
        llm.generate(prompts, blend, use_tqdm=False)
        prof.disable()
        walls.append(time.perf_counter() - t)
    counters = {k: v - before.get(k, 0.0) for k, v in _counters(llm).items()}
    stats = pstats.Stats(prof)
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)
    seconds = stage_seconds(stats)
    n = max(counters.get("kvplug_blend_requests", 0), 1)
    rec = max(counters.get("kvplug_blend_recomputed_tokens", 0), 1)
    table = [{"stage": label, "seconds": seconds.get(label), "per_request_s": seconds[label] / n if label in seconds else None,
              "per_recomputed_token_ms": 1e3 * seconds[label] / rec if label in seconds else None}
             for label in dict.fromkeys(label for label, _, _ in STAGES)]
    return {"label": args.label, "argv": sys.argv[1:], "machine": _machine(), "prompt_tokens": prompt_tokens,
            "prefill_s": prefill_s, "prefill_ms_per_token": 1e3 * prefill_s / prompt_tokens,
            "request_wall_s": walls, "counters": counters, "stages": table}


def _counters(llm) -> dict[str, float]:
    return {m.name.removeprefix("vllm:").removesuffix("_total"): float(m.value) for m in llm.get_metrics()
            if m.name.startswith("vllm:kvplug_") and hasattr(m, "value")}


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def print_table(r: dict) -> None:
    print(f"[{r['label']}] prompt {r['prompt_tokens']} tokens: plain prefill {r['prefill_s']:.2f} s "
          f"({r['prefill_ms_per_token']:.2f} ms/token); blended requests' wall {sum(r['request_wall_s']):.2f} s")
    c = r["counters"]
    print(f"  blends {c.get('kvplug_blend_requests', 0):.0f}, batches {c.get('kvplug_blend_batches', 0):.0f}, "
          f"blended tokens {c.get('kvplug_blend_tokens', 0):.0f}, recomputed {c.get('kvplug_blend_recomputed_tokens', 0):.0f}, "
          f"blend_seconds {c.get('kvplug_blend_seconds', 0):.2f}")
    print(f"  {'stage':58s} {'s total':>9s} {'s/request':>10s} {'ms/recomp. token':>17s}")
    for row in r["stages"]:
        if row["seconds"] is None:
            print(f"  {row['stage']:58s} {'-':>9s} {'-':>10s} {'-':>17s}")
        else:
            print(f"  {row['stage']:58s} {row['seconds']:9.3f} {row['per_request_s']:10.3f} {row['per_recomputed_token_ms']:17.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--docs", type=int, default=6)
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="requests sent together (one engine step blends them)")
    p.add_argument("--policy", default="query")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="now")
    p.add_argument("--top", type=int, default=0, help="also print the N functions with the most own time")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    r = run(args)
    print_table(r)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else {}
        old[args.label] = r
        args.json.write_text(json.dumps(old, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
