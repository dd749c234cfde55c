"""Analysis of the blend benchmark's engine results (benchmarks/blend.py): per family and
configuration the quality against full prefill with paired intervals, TTFT ratios, the headline.

    family_report(fam, qs, phases, policies) -> dict   every configuration's summary, the noise floor
    summarize(name, reqs, ref, qs, ttft_base) -> dict  one configuration against its reference
    add_paired(configs, base, key)                     paired intervals of every configuration against one
    headline(families, default_config) -> dict        the figures issues 17/18 name, by family
    slim_requests(phases) -> dict                      per-request records without the logprob dicts
    print_report(report)                               the tables

Reference: quality is measured against full prefill in the same engine (the blend engine's
`full_prefill_kvplug`, blend off), the noise floor (`full_prefill_cached`, vLLM served from its own
prefix cache) against vLLM alone's `full_prefill`; TTFT ratios against vLLM alone's full prefill
(p50 over the family's prompts). Per question: correct (gold), value agreement with the reference,
first-token KL (blend_metrics.KL_METHOD), the gold answer's mean log-likelihood per token (teacher
forced); the log-likelihood gap is reference minus configuration (> 0: the configuration is less
sure of the gold answer). Intervals: Wilson 95% for proportions, bootstrap 95% over questions for
means and paired differences.
"""
from __future__ import annotations

import math

from blend_metrics import (bootstrap_mean_ci, kl_first_token, mean_loglik, paired_bootstrap_ci,
                           smallest_reaching, top1, wilson_ci)
from serving import percentile, ratio

BAR = 0.02  # CacheBlend's quality bar: within 2 accuracy points of full prefill
REFERENCE = "full_prefill_kvplug"
NOISE = "full_prefill_cached"
ENDPOINTS = ("concat", "ratio_1")


def kv_params(config: str) -> dict:
    """The request's kv_transfer_params of a blend configuration."""
    if config == "concat":
        return {"recompute_ratio": 0.0, "recompute_policy": "query"}
    if config == "ratio_1":
        return {"recompute_ratio": 1.0, "recompute_policy": "query"}
    policy, r = config.rsplit("_", 1)
    return {"recompute_ratio": float(r), "recompute_policy": policy}


def by_family(phase: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in phase["requests"]:
        out.setdefault(r["id"].split("/", 1)[0], []).append(r)
    return out


def _loglik(r: dict) -> float:
    return mean_loglik(r.get("answer_logprobs") or [])


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _ci(pair) -> list:
    return [None if math.isnan(v) else v for v in pair]


def summarize(name: str, reqs: list[dict], ref: list[dict] | None, qs, ttft_base: float | None) -> dict:
    items = {f"{it.qid}": it for it in qs.items}
    correct = [int(bool(qs.correct(items[r["id"].split("/", 1)[1]], r["text"]))) for r in reqs]
    n = len(reqs)
    s = {"config": name, "n": n, "accuracy": sum(correct) / n if n else math.nan,
         "accuracy_ci95": list(wilson_ci(sum(correct), n)), "correct": correct,
         "ttft_p50_s": percentile([r["ttft_s"] for r in reqs], 50),
         "prompt_tokens_mean": sum(r["prompt_tokens"] for r in reqs) / n if n else math.nan,
         "loglik": [_loglik(r) for r in reqs], "forced_from": _count(r.get("forced_from") for r in reqs),
         "forced_errors": sum(1 for r in reqs if r.get("forced_error"))}
    s["loglik_mean"] = _mean(s["loglik"])
    s.update(kv_params(name) if not name.startswith("full_prefill") else
             {"recompute_ratio": 1.0, "recompute_policy": name})
    s["policy"], s["ratio"] = s.pop("recompute_policy"), s.pop("recompute_ratio")
    if name in ENDPOINTS:  # nothing or everything recomputed: the same under every policy
        s["policy"] = "any"
    _blend_counters(s, name, reqs)
    if ttft_base:
        s["ttft_ratio_vs_full"] = ratio(s["ttft_p50_s"], ttft_base)
    if ref is not None:
        _against(s, reqs, ref, qs)
    return s


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        if v is not None:
            out[v] = out.get(v, 0) + 1
    return out


def _blend_counters(s: dict, name: str, reqs: list[dict]) -> None:
    blended = sum(r["counters"].get("kvplug_blend_tokens", 0) for r in reqs)
    recomputed = sum(r["counters"].get("kvplug_blend_recomputed_tokens", 0) for r in reqs)
    s["recomputed_frac_of_blend_tokens"] = ratio(recomputed, blended) if blended else \
        (1.0 if name.startswith("full") else math.nan)
    s["blend_requests"] = sum(r["counters"].get("kvplug_blend_requests", 0) for r in reqs)
    s["blend_errors"] = sum(r["counters"].get("kvplug_blend_errors", 0) for r in reqs)


def _against(s: dict, reqs: list[dict], ref: list[dict], qs) -> None:
    """Quality of one configuration against its reference, question by question."""
    refs = {r["id"]: r for r in ref}
    pairs = [(r, refs[r["id"]]) for r in reqs]
    n = len(pairs)
    agree = [int(qs.answer_key(r["text"]) == qs.answer_key(f["text"])) for r, f in pairs]
    s["value_agree"] = sum(agree) / n if n else math.nan
    s["value_agree_ci95"] = list(wilson_ci(sum(agree), n))
    s["text_agree"] = sum(r["text"] == f["text"] for r, f in pairs) / n if n else math.nan
    s["kl"] = [kl_first_token(f["first_token_logprobs"], r["first_token_logprobs"]) for r, f in pairs]
    s["kl_mean"], s["kl_ci95"] = _mean(s["kl"]), _ci(bootstrap_mean_ci(s["kl"]))
    s["top1_agree"] = sum(top1(f["first_token_logprobs"]) == top1(r["first_token_logprobs"])
                          for r, f in pairs) / n if n else math.nan
    gap = [_loglik(f) - _loglik(r) for r, f in pairs]
    s["loglik_gap_mean"], s["loglik_gap_ci95"] = _mean(gap), _ci(bootstrap_mean_ci(gap))
    s["loglik_gap_abs_mean"] = _mean([abs(g) for g in gap])
    items = {f"{it.qid}": it for it in qs.items}
    ref_correct = [int(bool(qs.correct(items[f["id"].split("/", 1)[1]], f["text"]))) for _, f in pairs]
    s["acc_vs_full_ci95"] = _ci(paired_bootstrap_ci(s["correct"], ref_correct))


def add_paired(configs: dict, base: str, key: str) -> None:
    """<key>_acc_ci95, <key>_kl_ci95, <key>_loglik_ci95: paired 95% intervals of each
    configuration minus `base` over the same questions (accuracy, KL, log-likelihood)."""
    b = configs.get(base)
    if b is None:
        return
    for name, c in configs.items():
        if name == base or c["n"] != b["n"]:
            continue
        c[f"{key}_acc_ci95"] = _ci(paired_bootstrap_ci(c["correct"], b["correct"]))
        c[f"{key}_loglik_ci95"] = _ci(paired_bootstrap_ci(c["loglik"], b["loglik"]))
        if "kl" in c and "kl" in b:
            c[f"{key}_kl_ci95"] = _ci(paired_bootstrap_ci(c["kl"], b["kl"]))


def family_report(fam: str, qs, phases: dict, policies) -> dict:
    vllm_full = by_family(phases["full_prefill"])[fam]
    ref_name = REFERENCE if REFERENCE in phases else "full_prefill"
    ref = by_family(phases[ref_name])[fam]
    base = percentile([r["ttft_s"] for r in vllm_full], 50)
    configs = {}
    for name, ph in phases.items():
        reqs = by_family(ph).get(fam)
        if ph.get("warmup") or not reqs:
            continue
        against = vllm_full if name == NOISE else (None if name == ref_name else ref)
        configs[name] = summarize(name, reqs, against, qs, base)
    r = configs[ref_name]
    r.update(value_agree=1.0, text_agree=1.0, kl_mean=0.0, top1_agree=1.0, loglik_gap_mean=0.0,
             kl=[0.0] * r["n"])
    _same_engine_ratio(configs)
    add_paired(configs, "concat", "vs_concat")
    bar = {}
    for p in policies:
        pts = [(c["recomputed_frac_of_blend_tokens"], c["accuracy"]) for n, c in configs.items()
               if c["policy"] == p or n in ENDPOINTS]
        bar[p] = smallest_reaching(pts, r["accuracy"] - BAR)
    noise = configs.get(NOISE, {})
    return {"n_questions": len(qs.items), "source": qs.source, "params": qs.params, "reference": ref_name,
            "configs": configs, "noise_floor": {k: noise.get(k) for k in
                                                ("value_agree", "kl_mean", "kl_ci95", "top1_agree", "loglik_gap_mean",
                                                 "loglik_gap_abs_mean", "loglik_gap_ci95")},
            "smallest_recomputed_within_2_points": bar}


def _same_engine_ratio(configs: dict) -> None:
    """TTFT against the blend engine's own full prefills (run before and after, pooled)."""
    base = [c["ttft_p50_s"] for n, c in configs.items() if n.startswith(REFERENCE)]
    if base:
        for c in configs.values():
            c["ttft_ratio_vs_full_same_engine"] = ratio(c["ttft_p50_s"], sum(base) / len(base))


def headline(families: dict, default_config: str) -> dict:
    """{figure: {family: value}} for the figures issues 17 and 18 name, with intervals beside."""
    out: dict = {"default_config": default_config, "reference": REFERENCE,
                 "ttft_ratio": "p50 TTFT over vLLM alone's full prefill p50, same prompts"}

    def put(key, fam, value):
        out.setdefault(key, {})[fam] = value

    for fam, f in families.items():
        cfg, ref = f["configs"], f["configs"].get(f["reference"], {})
        d, concat, r1 = cfg.get(default_config, {}), cfg.get("concat", {}), cfg.get("ratio_1", {})
        put("n_questions", fam, f["n_questions"])
        gap = 100 * (ref["accuracy"] - d["accuracy"]) if d else None
        put("default_acc_gap_pts", fam, gap)
        ci = d.get("acc_vs_full_ci95")
        put("default_acc_gap_pts_ci95", fam, [None if v is None else 0.0 - 100 * v for v in ci[::-1]] if ci else None)
        put("default_kl", fam, d.get("kl_mean"))
        put("default_kl_ci95", fam, d.get("kl_ci95"))
        put("concat_kl", fam, concat.get("kl_mean"))
        put("concat_kl_ci95", fam, concat.get("kl_ci95"))
        put("default_loglik_gap", fam, d.get("loglik_gap_mean"))
        put("default_loglik_gap_ci95", fam, d.get("loglik_gap_ci95"))
        put("concat_loglik_gap", fam, concat.get("loglik_gap_mean"))
        put("default_value_agree", fam, d.get("value_agree"))
        put("default_ttft_ratio", fam, d.get("ttft_ratio_vs_full"))
        put("ratio0_ttft_ratio", fam, concat.get("ttft_ratio_vs_full"))
        put("ratio1_ttft_ratio", fam, r1.get("ttft_ratio_vs_full"))
        put("noise_floor_kl", fam, f["noise_floor"].get("kl_mean"))
        put("noise_floor_loglik_gap_abs", fam, f["noise_floor"].get("loglik_gap_abs_mean"))
    return out


def slim_requests(phases: dict) -> dict:
    """Per phase, each request without its logprob dicts (the engines' own files keep them)."""
    drop = ("first_token_logprobs",)
    return {n: [{**{k: v for k, v in r.items() if k not in drop},
                 "first_token": top1(r.get("first_token_logprobs") or {})} for r in ph["requests"]]
            for n, ph in phases.items()}


COLUMNS = ["config", "n", "accuracy", "accuracy_ci95", "value_agree", "kl_mean", "kl_ci95", "loglik_gap_mean",
           "loglik_gap_ci95", "recomputed_frac_of_blend_tokens", "ttft_p50_s", "ttft_ratio_vs_full",
           "ttft_ratio_vs_full_same_engine", "acc_vs_full_ci95", "vs_concat_acc_ci95", "vs_concat_kl_ci95"]


def _fmt_ci(ci) -> str:
    return "" if not ci or any(v is None for v in ci) else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def print_report(report: dict) -> None:
    import serving

    for fam, f in report["families"].items():
        nf = f["noise_floor"]
        print(f"\n{fam}: {f['n_questions']} questions ({f['source']}); reference = {f['reference']}; noise floor "
              f"(vLLM vs its own prefix cache): value agreement {nf.get('value_agree')}, KL {nf.get('kl_mean')}, "
              f"|loglik gap| {nf.get('loglik_gap_abs_mean')}")
        rows = [{**c, **{k: _fmt_ci(c.get(k)) for k in COLUMNS if k.endswith("ci95")}} for c in f["configs"].values()]
        serving.print_table(rows, COLUMNS)
        bar = f["smallest_recomputed_within_2_points"]
        print("smallest recomputed fraction within 2 points of full prefill: "
              + ", ".join(f"{p} {v if v is None else round(v, 3)}" for p, v in bar.items()))
    h = report.get("headline", {})
    fams = list(report["families"])
    rows = [{"figure": k, **{fam: _fmt_ci(v.get(fam)) if k.endswith("ci95") else v.get(fam) for fam in fams}}
            for k, v in h.items() if isinstance(v, dict)]
    print(f"\nheadline (default = {h.get('default_config')}, reference = {h.get('reference')}):")
    serving.print_table(rows, ["figure"] + fams)
    for name, err in report["errors"].items():
        print(f"ERROR {name}: {err}")
