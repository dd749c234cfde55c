"""KV blending benchmark: quality and TTFT of chunk-KV reuse with selective recompute, on an
offline multi-document QA set (benchmarks/workloads/multidoc_qa.py).

    python benchmarks/blend.py [--quick] [--json PATH] [--model PATH] [--data-dir .data]

Each question's prompt is a head, 6 passages of ~512 tokens (essay text with one synthetic fact
each, from a pool of 24) in a shuffled order, and the question, joined by " # # ". Passages
recur across questions at different positions: prefix caching reuses only the head, blending
reuses every passage.

Engines (offline `vllm.LLM`, each in its own subprocess: vLLM's engine core uses spawn and every
engine needs a fresh process): bf16, enforce_eager, max_model_len 8192, seed 0, prefix caching on.
Requests are sent one at a time. Each engine first prefills one long prompt without separators
(lazy set-up off the clock), and every configuration starts on an empty prefix cache.
  vllm engine (no connector)
    full_prefill       reset_prefix_cache() before every request: the quality reference and the
                       TTFT baseline
    vllm_prefix_cache  no resets, questions in order: what vLLM alone gets
  blend engine (KVPlugConnector, blend on, cpu_bytes 2e9)
    warm-up            every pool passage once (head + passage + neutral question), not counted
                       in any configuration, so every chunk is cached
    fixed_<r>          r in {0, 0.05, 0.15, 0.3, 1.0}: per-request recompute_ratio r, policy fixed
    adaptive           per-request recompute_policy adaptive, recompute_ratio 0.15
    (each with reset_prefix_cache() before every request: vLLM's own prefix cache must not hide
    the blending)
Per question and configuration: one timed generate with max_tokens=1 and logprobs=20 (TTFT =
its wall time, first-token logprobs), then one greedy generate with max_tokens=--max-tokens (the
answer; after another reset where the configuration resets). Counter deltas (vllm:kvplug_* and
vllm:prefix_cache_* from llm.get_metrics()) per request and per configuration.

Reported per configuration: answer agreement with full_prefill (exact text match; value_agree:
the same first integer, i.e. the same answer value whatever follows it), accuracy vs
the gold value (first integer of the answer), first-token KL(p_ref || q) and top-1 agreement vs
full_prefill, fraction of prompt tokens recomputed (blend_recomputed_tokens / prompt tokens, and
/ blend_tokens), TTFT p50/mean and TTFT p50 ratio to full_prefill.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serving import counter_delta, percentile, ratio  # noqa: E402

RESULTS = HERE / "results"
RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
LOGPROBS = 20
CPU_BYTES = 2e9
BLEND_COUNTERS = ("blend_requests", "blend_tokens", "blend_recomputed_tokens",
                  "blend_chunk_hits", "blend_chunk_misses")
KL_METHOD = (f"KL(p_ref || q) over the reference's top-{LOGPROBS} first-token candidates: both "
             "distributions renormalised over that set; a token missing from q's returned list "
             "gets q's smallest returned logprob")


# ---------------------------------------------------------------- metric helpers (pure)
def top_k(lp: dict, k: int = LOGPROBS) -> dict:
    """The k highest entries of {token: logprob} (vLLM may add the sampled token as a k+1-th)."""
    return dict(sorted(lp.items(), key=lambda kv: kv[1], reverse=True)[:k])


def kl_first_token(ref: dict, q: dict, k: int = LOGPROBS) -> float:
    """KL(p_ref || q) restricted to the reference's top-k tokens (see KL_METHOD). Token keys
    may be ints or strings; both dicts must use the same kind."""
    ref = top_k(ref, k)
    if not ref or not q:
        return math.nan
    floor = min(q.values())
    lq = {t: q.get(t, floor) for t in ref}

    def norm(d):
        m = max(d.values())
        z = m + math.log(sum(math.exp(v - m) for v in d.values()))
        return {t: v - z for t, v in d.items()}

    p, lq = norm(ref), norm(lq)
    return max(0.0, sum(math.exp(p[t]) * (p[t] - lq[t]) for t in p))


def top1(lp: dict):
    return max(lp.items(), key=lambda kv: kv[1])[0] if lp else None


def top1_agree(ref: dict, q: dict) -> bool:
    return top1(ref) is not None and top1(ref) == top1(q)


def agreement(texts: list[str], ref_texts: list[str]) -> tuple[int, int]:
    """(exact matches, compared) of two equally long lists of generated texts."""
    if len(texts) != len(ref_texts):
        raise ValueError(f"{len(texts)} texts vs {len(ref_texts)} reference texts")
    return sum(a == b for a, b in zip(texts, ref_texts)), len(texts)


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text.replace(",", ""))
    return m.group(0) if m else None


def value_agreement(texts: list[str], ref_texts: list[str]) -> tuple[int, int]:
    """(answers whose first integer equals the reference's, compared): the answer value, not the
    words the model adds after it."""
    if len(texts) != len(ref_texts):
        raise ValueError(f"{len(texts)} texts vs {len(ref_texts)} reference texts")
    return sum(first_number(a) == first_number(b) for a, b in zip(texts, ref_texts)), len(texts)


# ---------------------------------------------------------------- engine worker (subprocess)
def _metrics(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith(("vllm:kvplug_", "vllm:prefix_cache_")) and hasattr(m, "value"):
            out[m.name.removeprefix("vllm:")] = float(m.value)
    return out


def run_engine(spec: dict, out_path: Path) -> None:
    """SPEC: {model, extra (None: no connector), max_model_len, max_tokens, phases: [{name,
    reset_each, kv_params, warmup, prompts: [{id, prompt}]}]}. Writes results after every phase
    (a crash keeps what ran)."""
    from vllm import LLM, SamplingParams

    kwargs = {}
    if spec["extra"] is not None:
        kwargs["kv_transfer_config"] = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": spec["extra"]}
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], enforce_eager=True, dtype="bfloat16", seed=0,
              max_model_len=spec["max_model_len"], enable_prefix_caching=True,
              disable_log_stats=False, **kwargs)
    result = {"engine_start_s": time.perf_counter() - t0, "phases": []}
    # One long request without a separator (plain prefill on every engine) so one-time lazy
    # set-up is not charged to the first timed request; then an empty prefix cache.
    t = time.perf_counter()
    llm.generate([spec["engine_warmup_prompt"]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    result["engine_warmup_s"] = time.perf_counter() - t
    llm.reset_prefix_cache()

    def params(max_tokens, kv):
        extra = {"kv_transfer_params": dict(kv)} if kv else None
        return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=LOGPROBS, extra_args=extra)

    for ph in spec["phases"]:
        print(f"[{ph['name']}] {len(ph['prompts'])} requests", flush=True)
        llm.reset_prefix_cache()  # no phase starts on what the one before left cached
        m_start, t_phase, reqs = _metrics(llm), time.perf_counter(), []
        for p in ph["prompts"]:
            if ph["reset_each"]:
                llm.reset_prefix_cache()
            m0 = _metrics(llm)
            t = time.perf_counter()
            o = llm.generate([p["prompt"]], params(1, ph["kv_params"]), use_tqdm=False)[0]
            ttft = time.perf_counter() - t
            m1 = _metrics(llm)
            rec = {"id": p["id"], "prompt_tokens": len(o.prompt_token_ids), "ttft_s": ttft,
                   "first_token_logprobs": {str(tid): lp.logprob for tid, lp in o.outputs[0].logprobs[0].items()},
                   "first_token_id": o.outputs[0].token_ids[0], "counters": counter_delta(m1, m0)}
            if not ph["warmup"]:
                if ph["reset_each"]:
                    llm.reset_prefix_cache()
                a = llm.generate([p["prompt"]], params(spec["max_tokens"], ph["kv_params"]), use_tqdm=False)[0]
                rec.update(text=a.outputs[0].text, answer_token_ids=list(a.outputs[0].token_ids),
                           answer_counters=counter_delta(_metrics(llm), m1))
            reqs.append(rec)
            print(f"  [{ph['name']}] {p['id']}: ttft {ttft:.3f} s ({rec['prompt_tokens']} tok)"
                  + (f" -> {rec['text']!r}" if "text" in rec else ""), flush=True)
        time.sleep(0.5)  # let the last step's stats land before the phase total
        result["phases"].append({"name": ph["name"], "wall_s": time.perf_counter() - t_phase,
                                 "counters": counter_delta(_metrics(llm), m_start), "requests": reqs})
        out_path.write_text(json.dumps(result))
    result["complete"] = True
    out_path.write_text(json.dumps(result))


def spawn_engine(name: str, spec: dict, work: Path, env: dict, timeout_s: float) -> dict:
    """Run one engine in `python blend.py --worker`; its output streams to work/<name>.log.
    Returns the worker's result, with "error" set when it failed (partial phases kept)."""
    spec_p, out_p, log_p = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_p.write_text(json.dumps(spec))
    out_p.unlink(missing_ok=True)
    print(f"== engine {name}: log {log_p}", flush=True)
    with open(log_p, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_p),
                                 str(out_p)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=work)
        deadline = time.monotonic() + timeout_s
        for line in proc.stdout:  # progress lines to the console, everything to the log
            log.write(line)
            if line.startswith(("[", "  [")):
                print(line, end="", flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                break
        rc = proc.wait()
    res = json.loads(out_p.read_text()) if out_p.exists() else {"phases": []}
    if rc != 0 or not res.get("complete"):
        res["error"] = explain_failure(log_p.read_text(errors="replace"), rc, spec["extra"])
        print(f"ERROR engine {name}: {res['error']}", flush=True)
    return res


def explain_failure(log: str, rc: int, extra: dict | None) -> str:
    lines = log.splitlines()
    unknown = [ln for ln in lines if "unknown key" in ln and "kv_connector_extra_config" in ln]
    if unknown and extra and "blend" in extra:
        msg = unknown[-1].split("ValueError:", 1)[-1].strip()
        return (f"the connector rejected the blend keys (this kvplug has no blend feature yet?): {msg}")
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    tail = errors[-3:] if errors else lines[-5:]
    return f"engine exited with rc={rc}: " + " | ".join(ln.strip() for ln in tail)


# ---------------------------------------------------------------- configurations
def config_phases(qs, names: list[str]) -> tuple[list[dict], list[dict]]:
    """(vllm engine phases, blend engine phases) for the chosen configuration names."""
    prompts = [{"id": it.qid, "prompt": qs.prompt(it)} for it in qs.items]
    vllm = [{"name": n, "reset_each": n == "full_prefill", "kv_params": None, "warmup": False,
             "prompts": prompts} for n in ("full_prefill", "vllm_prefix_cache") if n in names]
    blend = []
    for r in RATIOS:
        n = fixed_name(r)
        if n in names:
            blend.append({"name": n, "reset_each": True, "warmup": False, "prompts": prompts,
                          "kv_params": {"recompute_ratio": r, "recompute_policy": "fixed"}})
    if "adaptive" in names:
        blend.append({"name": "adaptive", "reset_each": True, "warmup": False, "prompts": prompts,
                      "kv_params": {"recompute_ratio": 0.15, "recompute_policy": "adaptive"}})
    if blend:
        warm = [{"id": f"passage{d}", "prompt": qs.passage_chunk_prompt(d)} for d in range(len(qs.passages))]
        blend.insert(0, {"name": "warmup", "reset_each": False, "warmup": True, "kv_params": None,
                         "prompts": warm})
    return vllm, blend


def fixed_name(r: float) -> str:
    return f"fixed_{r:g}"


ALL_CONFIGS = ["full_prefill", "vllm_prefix_cache", *(fixed_name(r) for r in RATIOS), "adaptive"]


# ---------------------------------------------------------------- analysis
def summarize(phase: dict, ref: dict | None, gold: dict) -> dict:
    reqs = phase["requests"]
    texts = [r["text"] for r in reqs]
    ttfts = [r["ttft_s"] for r in reqs]
    prompt_tokens = sum(r["prompt_tokens"] for r in reqs)
    c = phase["counters"]
    s = {"config": phase["name"], "n": len(reqs),
         "accuracy": sum(gold[r["id"]](r["text"]) for r in reqs) / len(reqs) if reqs else math.nan,
         "ttft_p50_s": percentile(ttfts, 50), "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else math.nan,
         "prompt_tokens_mean": prompt_tokens / len(reqs) if reqs else math.nan,
         **{k: c.get(f"kvplug_{k}", 0.0) for k in BLEND_COUNTERS},
         "vllm_prefix_hit_tok": c.get("prefix_cache_hits", 0.0),
         "vllm_prefix_query_tok": c.get("prefix_cache_queries", 0.0)}
    # per blended request (the timed and the answer request of a question may both blend)
    s["recomputed_frac_of_prompt"] = ratio(s["blend_recomputed_tokens"],
                                           s["blend_requests"] * s["prompt_tokens_mean"]) \
        if s["blend_requests"] else math.nan
    s["recomputed_frac_of_blend_tokens"] = ratio(s["blend_recomputed_tokens"], s["blend_tokens"]) \
        if s["blend_tokens"] else math.nan
    if ref is not None:
        by_id = {r["id"]: r for r in ref["requests"]}
        refs = [by_id[r["id"]] for r in reqs]
        s["answer_agree"] = agreement(texts, [r["text"] for r in refs])[0] / len(reqs)
        s["value_agree"] = value_agreement(texts, [r["text"] for r in refs])[0] / len(reqs)
        kls = [kl_first_token(rf["first_token_logprobs"], r["first_token_logprobs"]) for r, rf in zip(reqs, refs)]
        s["kl_mean"] = sum(kls) / len(kls)
        s["kl_max"] = max(kls)
        s["top1_agree"] = sum(top1_agree(rf["first_token_logprobs"], r["first_token_logprobs"])
                              for r, rf in zip(reqs, refs)) / len(reqs)
        ref_p50 = percentile([r["ttft_s"] for r in ref["requests"]], 50)
        s["ttft_ratio_vs_full"] = ratio(s["ttft_p50_s"], ref_p50)
        s["disagreements"] = [{"id": r["id"], "got": r["text"], "want": rf["text"]}
                              for r, rf in zip(reqs, refs) if r["text"] != rf["text"]]
    return s


COLUMNS = ["config", "n", "answer_agree", "value_agree", "accuracy", "kl_mean", "kl_max", "top1_agree",
           "recomputed_frac_of_prompt", "ttft_p50_s", "ttft_mean_s", "ttft_ratio_vs_full"]
COUNTER_COLUMNS = ["config", "blend_requests", "blend_tokens", "blend_recomputed_tokens",
                   "recomputed_frac_of_blend_tokens", "blend_chunk_hits", "blend_chunk_misses",
                   "vllm_prefix_hit_tok", "vllm_prefix_query_tok"]


def print_report(report: dict) -> None:
    import serving

    rows = list(report["configs"].values())
    print(f"\nmulti-document QA: {report['dataset']['n_questions']} questions x "
          f"{report['dataset']['docs_per_prompt']} passages, prompt ~{report['dataset']['prompt_tokens_mean']:.0f} "
          f"tokens, {report['dataset']['frame']} frame; reference = full_prefill")
    serving.print_table(rows, COLUMNS)
    print("\ncounters per configuration (timed + answer requests)")
    serving.print_table(rows, COUNTER_COLUMNS)
    w = report.get("warmup_counters")
    if w:
        print("blend warm-up pass counters: "
              f"{ {k: v for k, v in sorted(w.items()) if 'blend' in k or 'prefix_cache' in k} }")
    for name, err in report["errors"].items():
        print(f"ERROR {name}: {err}")


# ---------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="6 questions (default 30)")
    p.add_argument("--json", type=Path, default=None, help="output (default benchmarks/results/blend.json, "
                   "blend_quick.json with --quick)")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2)")
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--questions", type=int, default=None)
    p.add_argument("--pool", type=int, default=24, help="passages in the pool")
    p.add_argument("--docs-per-prompt", type=int, default=6)
    p.add_argument("--passage-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frame", choices=("chat", "plain"), default="chat",
                   help="prompt format: the model's chat template (default) or Question:/Answer:")
    p.add_argument("--max-tokens", type=int, default=12, help="answer length (greedy)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--configs", default=",".join(ALL_CONFIGS),
                   help=f"comma list out of {','.join(ALL_CONFIGS)} (full_prefill always runs)")
    p.add_argument("--reserved-cpus", type=int, default=1,
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU for both engines (same compute cores)")
    p.add_argument("--engine-timeout", type=float, default=3600)
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.questions = a.questions or (6 if a.quick else 30)
    a.json = a.json or RESULTS / ("blend_quick.json" if a.quick else "blend.json")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        run_engine(json.loads(Path(args.worker[0]).read_text()), Path(args.worker[1]))
        return 0
    t_all = time.monotonic()
    import serving
    from models import resolve_model
    from transformers import AutoTokenizer
    from workloads import multidoc_qa as mq

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = sorted(set(names) - set(ALL_CONFIGS))
    if bad:
        raise SystemExit(f"unknown configuration(s) {bad}; allowed: {ALL_CONFIGS}")
    if "full_prefill" not in names:
        names.insert(0, "full_prefill")
    args.model = resolve_model(args.model, args.data_dir)
    tok = AutoTokenizer.from_pretrained(args.model)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    frame = mq.chat_frame(tok) if args.frame == "chat" else mq.plain_frame()
    qs = mq.build(args.questions, args.pool, args.docs_per_prompt, args.passage_tokens, args.seed, enc, frame)
    ptoks = [len(enc(qs.prompt(it))) for it in qs.items]
    print(f"{len(qs.items)} questions, pool {args.pool} passages ({qs.source}), prompt tokens "
          f"{min(ptoks)}-{max(ptoks)}, frame {frame.name}", flush=True)
    work = Path(args.data_dir).resolve() / "bench" / "blend"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env = serving.same_cpu_threads_env({**env, "VLLM_CPU_KVCACHE_SPACE": "1"}, args.reserved_cpus)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    vllm_phases, blend_phases = config_phases(qs, names)
    base = {"model": args.model, "max_model_len": args.max_model_len, "max_tokens": args.max_tokens,
            "engine_warmup_prompt": qs.system + " " + " ".join(qs.passages[:4])}
    extra = {"cpu_bytes": CPU_BYTES, "blend": True, "recompute_ratio": 0.15, "recompute_policy": "fixed"}
    engines = {"vllm": spawn_engine("vllm", {**base, "extra": None, "phases": vllm_phases}, work, env,
                                    args.engine_timeout)}
    if blend_phases:
        engines["blend"] = spawn_engine("blend", {**base, "extra": extra, "phases": blend_phases}, work,
                                        env, args.engine_timeout)
    phases = {ph["name"]: ph for e in engines.values() for ph in e["phases"]}
    if "full_prefill" not in phases:
        raise SystemExit(f"the reference configuration did not run: {engines['vllm'].get('error')}")
    gold = {it.qid: (lambda text, a=it.answer: mq.answer_correct(text, a)) for it in qs.items}
    ref = phases["full_prefill"]
    stats = {n: summarize(phases[n], None if n == "full_prefill" else ref, gold)
             for n in names if n in phases}
    stats["full_prefill"].update(answer_agree=1.0, value_agree=1.0, kl_mean=0.0, kl_max=0.0, top1_agree=1.0, ttft_ratio_vs_full=1.0)
    errors = {n: e["error"] for n, e in engines.items() if e.get("error")}
    report = {
        "benchmark": "blend", "quick": args.quick,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.monotonic() - t_all, "machine": serving.machine_info(), "model": args.model,
        "kvplug_head": subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"],
                                      capture_output=True, text=True).stdout.strip(),
        "kvplug_uncommitted": subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "kvplug", "triton_kernels"],
            capture_output=True, text=True).stdout.splitlines(),
        "dataset": {**qs.params, "source": qs.source, "frame": frame.name, "system": qs.system,
                    "prompt_tokens_mean": sum(ptoks) / len(ptoks),
                    "questions": [{"id": it.qid, "doc_ids": list(it.doc_ids), "target": it.target,
                                   "question": it.question, "answer": it.answer} for it in qs.items]},
        "protocol": {"engine": {"dtype": "bfloat16", "enforce_eager": True, "seed": 0,
                                "max_model_len": args.max_model_len, "enable_prefix_caching": True},
                     "blend_extra_config": extra, "sequential": True, "greedy": True,
                     "answer_max_tokens": args.max_tokens, "first_token_logprobs": LOGPROBS,
                     "ttft": "wall time of one LLM.generate with max_tokens=1, logprobs=20",
                     "kl_method": KL_METHOD,
                     "accuracy": "first integer in the generated text equals the gold value",
                     "answer_agree": "generated text identical to full_prefill's",
                     "value_agree": "first integer of the generated text equals full_prefill's",
                     "recomputed_frac_of_prompt": "delta(blend_recomputed_tokens) / (delta(blend_requests)"
                     " x mean prompt tokens) over the configuration's requests",
                     "reserved_cpus": args.reserved_cpus},
        "configs": stats,
        "warmup_counters": phases["warmup"]["counters"] if "warmup" in phases else None,
        "engine_start_s": {n: e.get("engine_start_s") for n, e in engines.items()},
        "engine_warmup_s": {n: e.get("engine_warmup_s") for n, e in engines.items()},
        "errors": errors,
        "requests": {n: phases[n]["requests"] for n in names if n in phases},
    }
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json} (wall {report['wall_s']:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
