"""KV blending benchmark: answer quality and TTFT of chunk-KV reuse, every recompute policy at every
budget, on two offline multi-document QA families, side by side in one run.

    python benchmarks/blend.py [--quick] [--json PATH] [--model PATH] [--data-dir .data] [--per-family N]

Families (each prompt: a head, 6 passages of ~512 tokens in a shuffled order, the question, joined by
" # # "; passages recur across questions at new positions, so prefix caching reuses only the head):
    synthetic  essay text with one invented fact per passage; the answer is a 5-digit value
               (benchmarks/workloads/multidoc_qa.py)
    squad      SQuAD v1.1 dev passages (BIG-bench's squad_shifts copy, extracted at set-up into
               .data/bigbench, never committed); the gold passage among 5 from other articles;
               extractive answers (benchmarks/workloads/squad_qa.py)
Engines (bf16, enforce_eager, seed 0, prefix caching on, requests one at a time):
    vllm   no connector. full_prefill: vLLM's prefix cache reset before each request (the quality
           reference and the TTFT baseline); full_prefill_cached: the same prompt again at once,
           served from vLLM's own prefix cache: how often bf16 alone changes a greedy answer (the
           agreement noise floor blends are judged against)
    blend  KVPlugConnector with blend on. A warm-up pass puts every pool passage through vLLM once
           (the worker saves each as a chunk); then every configuration, with vLLM's prefix cache
           reset before each request: concat (ratio 0: the re-rotated cached KV, nothing recomputed),
           ratio_1 (everything recomputed), and <policy>_<ratio> for every policy and ratio; before
           and after them full_prefill_kvplug(_after): plain prefills (blend off, a fresh cache_salt
           each) in the same engine, the TTFT baseline under the blends' own conditions.
Per request: one greedy generate with the first-token logprobs; TTFT is vLLM's first-token latency.
Reported per family and configuration: accuracy against gold with a 95% Wilson interval, agreement
with full prefill (same answer value / normalised answer), first-token KL and top-1 agreement,
recomputed fraction of the blended tokens (kvplug's counters), TTFT p50 and its ratio to full
prefill; per policy the smallest recomputed fraction within 2 points of full prefill's accuracy;
the paired difference to concat with a bootstrap interval. A Pareto plot (accuracy against
recomputed fraction, one line per policy) is written beside the JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from blend_engine import spawn_engine  # noqa: E402
from blend_metrics import (kl_first_token, paired_bootstrap_ci, smallest_reaching, top1_agree,  # noqa: E402
                           wilson_ci)
from serving import percentile, ratio  # noqa: E402

RESULTS = HERE / "results"
POLICIES = ("query", "mixed", "epic", "fixed", "adaptive")
RATIOS = (0.05, 0.1, 0.15, 0.3)
QUICK_CONFIGS = ("concat", "ratio_1", "query_0.15", "fixed_0.15", "mixed_0.15")
BAR = 0.02  # CacheBlend's quality bar: within 2 accuracy points of full prefill
MAX_TOKENS = {"synthetic": 12, "squad": 24}
CPU_BYTES = 4e9


def config_names(quick: bool) -> list[str]:
    if quick:
        return list(QUICK_CONFIGS)
    return ["concat", "ratio_1"] + [f"{p}_{r:g}" for p in POLICIES for r in RATIOS]


def kv_params(config: str) -> dict:
    """The request's kv_transfer_params of a blend configuration."""
    if config == "concat":
        return {"recompute_ratio": 0.0, "recompute_policy": "query"}
    if config == "ratio_1":
        return {"recompute_ratio": 1.0, "recompute_policy": "query"}
    policy, r = config.rsplit("_", 1)
    return {"recompute_ratio": float(r), "recompute_policy": policy}


def build_families(args, tok) -> dict:
    from workloads import multidoc_qa as mq
    from workloads import squad_qa as sq

    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    frame = mq.chat_frame(tok)
    n = args.per_family
    return {"synthetic": mq.build(n, args.pool, 6, 512, args.seed, enc, frame),
            "squad": sq.build(sq.fetch_squad(args.data_dir), n, args.pool, 6, 512, args.seed, enc, frame)}


def requests(fam: str, qs) -> list[dict]:
    return [{"id": f"{fam}/{it.qid}", "prompt": qs.prompt(it), "max_tokens": MAX_TOKENS[fam]} for it in qs.items]


def engine_specs(args, families: dict, configs: list[str]) -> tuple[dict, dict]:
    everything = [r for fam, qs in families.items() for r in requests(fam, qs)]
    warm = [{"id": f"{fam}/passage{d}", "prompt": qs.passage_chunk_prompt(d), "max_tokens": 1}
            for fam, qs in families.items() for d in range(len(qs.passages))]
    base = {"model": args.model, "max_model_len": 8192, "dtype": "bfloat16",
            "engine_warmup_prompt": families["synthetic"].system + " " + " ".join(families["synthetic"].passages[:4])}
    vllm = {**base, "extra": None, "phases": [
        {"name": "full_prefill", "reset_each": True, "repeat_cached": True, "kv_params": None, "warmup": False,
         "requests": everything}]}
    # The warm-up's own blocks go to the prefix tier under a blend root no configuration uses
    # (fixed at ratio 1), so no configuration gets exact prefix blocks the others do not.
    phases = [{"name": "warmup", "reset_each": False, "kv_params": {"recompute_ratio": 1.0, "recompute_policy": "fixed"},
               "warmup": True, "requests": warm}]
    # Full prefills in the blend engine too, before and after the configurations (a fresh cache_salt
    # each: nothing cached anywhere): the TTFT baseline under the same conditions as the blends.
    # Measured requests save nothing ("save": false): their blocks would churn the CPU tier and
    # could evict the pool's chunks, so every configuration sees the same cached chunks.
    same = {"reset_each": True, "salt_each": True, "kv_params": {"blend": False, "save": False}, "warmup": False,
            "requests": everything}
    phases += [{"name": "full_prefill_kvplug", **same}]
    phases += [{"name": c, "reset_each": True, "kv_params": {**kv_params(c), "save": False}, "warmup": False,
                "requests": everything} for c in configs]
    phases += [{"name": "full_prefill_kvplug_after", **same}]
    blend = {**base, "extra": {"cpu_bytes": CPU_BYTES, "blend": True}, "phases": phases}
    return vllm, blend


# ---------------------------------------------------------------- analysis
def _by_family(phase: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in phase["requests"]:
        out.setdefault(r["id"].split("/", 1)[0], []).append(r)
    return out


def summarize(name: str, reqs: list[dict], ref: list[dict] | None, qs, counters: dict) -> dict:
    items = {f"{it.qid}": it for it in qs.items}
    correct = [bool(qs.correct(items[r["id"].split("/", 1)[1]], r["text"])) for r in reqs]
    n = len(reqs)
    s = {"config": name, "n": n, "accuracy": sum(correct) / n if n else math.nan,
         "accuracy_ci95": list(wilson_ci(sum(correct), n)), "correct": [int(c) for c in correct],
         "ttft_p50_s": percentile([r["ttft_s"] for r in reqs], 50),
         "prompt_tokens_mean": sum(r["prompt_tokens"] for r in reqs) / n if n else math.nan}
    s.update(kv_params(name) if not name.startswith("full_prefill") else
             {"recompute_ratio": 1.0, "recompute_policy": name})
    s["policy"], s["ratio"] = s.pop("recompute_policy"), s.pop("recompute_ratio")
    if name in ("concat", "ratio_1"):  # nothing or everything recomputed: the same under every policy
        s["policy"] = "any"
    blended = sum(r["counters"].get("kvplug_blend_tokens", 0) for r in reqs)
    recomputed = sum(r["counters"].get("kvplug_blend_recomputed_tokens", 0) for r in reqs)
    s["recomputed_frac_of_blend_tokens"] = ratio(recomputed, blended) if blended else \
        (1.0 if name.startswith("full") else math.nan)
    s["blend_requests"] = sum(r["counters"].get("kvplug_blend_requests", 0) for r in reqs)
    s["blend_errors"] = sum(r["counters"].get("kvplug_blend_errors", 0) for r in reqs)
    if ref is not None:
        refs = {r["id"]: r for r in ref}
        pairs = [(r, refs[r["id"]]) for r in reqs]
        s["value_agree"] = sum(qs.answer_key(r["text"]) == qs.answer_key(f["text"]) for r, f in pairs) / n
        s["text_agree"] = sum(r["text"] == f["text"] for r, f in pairs) / n
        s["kl_mean"] = sum(kl_first_token(f["first_token_logprobs"], r["first_token_logprobs"]) for r, f in pairs) / n
        s["top1_agree"] = sum(top1_agree(f["first_token_logprobs"], r["first_token_logprobs"]) for r, f in pairs) / n
        s["ttft_ratio_vs_full"] = ratio(s["ttft_p50_s"], percentile([f["ttft_s"] for f in ref], 50))
    return s


def add_same_engine_ratio(configs: dict) -> None:
    """TTFT against the blend engine's own full prefills (run before and after, pooled)."""
    base = [c["ttft_p50_s"] for n, c in configs.items() if n.startswith("full_prefill_kvplug")]
    if not base:
        return
    ref = sum(base) / len(base)
    for c in configs.values():
        c["ttft_ratio_vs_full_same_engine"] = ratio(c["ttft_p50_s"], ref)


def family_report(fam: str, qs, phases: dict) -> dict:
    ref = _by_family(phases["full_prefill"])[fam]
    configs = {}
    for name, ph in phases.items():
        if ph.get("warmup"):
            continue
        reqs = _by_family(ph).get(fam)
        if reqs:
            configs[name] = summarize(name, reqs, None if name == "full_prefill" else ref, qs, ph["counters"])
    full = configs["full_prefill"]
    full.update(value_agree=1.0, text_agree=1.0, kl_mean=0.0, top1_agree=1.0, ttft_ratio_vs_full=1.0)
    add_same_engine_ratio(configs)
    concat = configs.get("concat")
    for c in configs.values():
        if concat is not None and c is not concat and len(c["correct"]) == len(concat["correct"]):
            c["vs_concat_ci95"] = list(paired_bootstrap_ci(c["correct"], concat["correct"]))
    bar = {}
    for p in POLICIES:
        pts = [(c["recomputed_frac_of_blend_tokens"], c["accuracy"]) for n, c in configs.items()
               if c["policy"] == p or n in ("concat", "ratio_1")]
        bar[p] = smallest_reaching(pts, full["accuracy"] - BAR)
    return {"n_questions": len(qs.items), "source": qs.source, "params": qs.params, "configs": configs,
            "noise_floor_value_agree": configs.get("full_prefill_cached", {}).get("value_agree"),
            "smallest_recomputed_within_2_points": bar}


def default_policy() -> str:
    from kvplug.config import BlendConfig

    return BlendConfig().recompute_policy


COLUMNS = ["config", "n", "accuracy", "accuracy_ci95", "value_agree", "kl_mean", "top1_agree",
           "recomputed_frac_of_blend_tokens", "ttft_p50_s", "ttft_ratio_vs_full", "ttft_ratio_vs_full_same_engine",
           "vs_concat_ci95"]


def print_report(report: dict) -> None:
    import serving

    for fam, f in report["families"].items():
        print(f"\n{fam}: {f['n_questions']} questions ({f['source']}); reference = full_prefill; "
              f"noise floor (vLLM vs its own prefix cache, value agreement) = {f['noise_floor_value_agree']}")
        rows = [{**c, "accuracy_ci95": _fmt_ci(c.get("accuracy_ci95")), "vs_concat_ci95": _fmt_ci(c.get("vs_concat_ci95"))}
                for c in f["configs"].values()]
        serving.print_table(rows, COLUMNS)
        print("smallest recomputed fraction within 2 points of full prefill: "
              + ", ".join(f"{p} {v if v is None else round(v, 3)}" for p, v in f["smallest_recomputed_within_2_points"].items()))
    for name, err in report["errors"].items():
        print(f"ERROR {name}: {err}")


def _fmt_ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def pareto_plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(report["families"])
    fig, axes = plt.subplots(1, len(fams), figsize=(6.2 * len(fams), 4.6), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        cfg = report["families"][fam]["configs"]
        full = cfg["full_prefill"]
        ax.axhline(full["accuracy"], color="black", ls="--", lw=1, label="full prefill")
        ax.axhspan(full["accuracy"] - BAR, full["accuracy"], color="grey", alpha=0.15, label="within 2 points")
        for p in POLICIES:
            pts = sorted((c["recomputed_frac_of_blend_tokens"], c["accuracy"]) for n, c in cfg.items()
                         if c["policy"] == p or n in ("concat", "ratio_1"))
            if len(pts) > 2:
                ax.plot(*zip(*pts), marker="o", ms=4, label=p)
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("recomputed fraction of blended tokens")
        ax.set_ylabel("accuracy against gold")
        ax.set_title(f"{fam} ({report['families'][fam]['n_questions']} questions)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"8 questions per family, configs {', '.join(QUICK_CONFIGS)}")
    p.add_argument("--json", type=Path, default=None,
                   help="output (default benchmarks/results/blend.json, blend_quick.json with --quick)")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2)")
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--per-family", type=int, default=None, help="questions per family (default 64, 8 with --quick)")
    p.add_argument("--pool", type=int, default=24, help="passages in each family's pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=None, help="comma list of blend configurations (default: all)")
    p.add_argument("--reserved-cpus", type=int, default=1,
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU for both engines (same compute cores)")
    p.add_argument("--engine-timeout", type=float, default=4 * 3600)
    p.add_argument("--reuse", default="", help="comma list of engines (vllm, blend) whose finished results of an "
                   "identical spec in .data/bench/blend are reused instead of run again")
    p.add_argument("--resume", action="store_true", help="an engine whose run of an identical spec stopped part way "
                   "keeps its finished phases; a new engine runs the warm-up phases and the rest")
    a = p.parse_args(argv)
    a.per_family = a.per_family or (8 if a.quick else 64)
    a.json = a.json or RESULTS / ("blend_quick.json" if a.quick else "blend.json")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all = time.monotonic()
    import serving
    from models import resolve_model
    from transformers import AutoTokenizer

    args.model = resolve_model(args.model, args.data_dir)
    configs = args.configs.split(",") if args.configs else config_names(args.quick)
    families = build_families(args, AutoTokenizer.from_pretrained(args.model))
    work = Path(args.data_dir).resolve() / "bench" / "blend"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env = serving.same_cpu_threads_env({**env, "VLLM_CPU_KVCACHE_SPACE": "2"}, args.reserved_cpus)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    vllm_spec, blend_spec = engine_specs(args, families, configs)
    engines = {}
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
    phases = {ph["name"]: ph for e in engines.values() for ph in e["phases"]}
    if "full_prefill" not in phases:
        raise SystemExit(f"the reference did not run: {engines['vllm'].get('error')}")
    report = {
        "benchmark": "blend", "quick": args.quick, "default_policy": default_policy(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": serving.machine_info(), "model": args.model, "kvplug_head": _git("rev-parse", "HEAD"),
        "kvplug_uncommitted": _git("status", "--porcelain", "--", "kvplug", "triton_kernels").splitlines(),
        "protocol": {"dtype": "bfloat16", "enforce_eager": True, "greedy": True, "max_tokens": MAX_TOKENS,
                     "ttft": "vLLM's first_token_latency of the request", "quality_bar": BAR,
                     "blend_extra_config": blend_spec["extra"], "configs": configs,
                     "accuracy_ci": "Wilson 95%", "vs_concat_ci": "paired bootstrap 95% over questions"},
        "families": {fam: family_report(fam, qs, phases) for fam, qs in families.items()},
        "engine_start_s": {n: e.get("engine_start_s") for n, e in engines.items()},
        "engine_runs": {n: e["engine_runs"] for n, e in engines.items() if e.get("engine_runs")},
        "errors": {n: e["error"] for n, e in engines.items() if e.get("error")},
        "requests": {n: ph["requests"] for n, ph in phases.items()},
    }
    report["wall_s"] = time.monotonic() - t_all
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    png = pareto_plot(report, args.json.with_suffix(".png"))
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
