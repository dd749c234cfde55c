"""PNG plots of a serve benchmark report (matplotlib, Agg backend: no display needed).

    ttft_distribution(report, path)   TTFT per configuration and policy: box plot + points
    throughput(report, path)          requests/s and output tokens/s per configuration (bars)
    policies(report, path)            hit rate and TTFT p50/p90 per eviction policy (bars)
    blend(report, path)               chunk hit rate and recomputed fraction per blend configuration
    write_all(report, prefix) -> list[Path]   the above as <prefix>{ttft,throughput,policies,blend}.png
                                      (policies and blend only when the report has them)
    blend_frontier(report, path)      blend benchmark: KL, log-likelihood gap and accuracy against
                                      TTFT ratio, one line per policy, one column per family

A report is the dict ``benchmarks/serve.py`` writes: "configs" and "policies" hold per-run
stats, "requests" the per-request records (``ttft_s`` per request) keyed by configuration,
"blend" the blend summary of each blend configuration. ``blend_frontier`` takes the report of
``benchmarks/blend.py`` ("families" -> configs with kl_mean, loglik_gap_mean, accuracy, ttft_ratio_vs_full).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAIN_COLOR, POLICY_COLOR = "#4C72B0", "#DD8452"


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if x is not None and not math.isnan(float(x))]


def _subtitle(report: dict) -> str:
    w, m = report.get("workload", {}), report.get("machine", {})
    load = report.get("load_average", {}).get("during", {})
    parts = [f"{w.get('name', '?')}: {w.get('requests', '?')} req, conc {w.get('concurrency', '?')}",
             f"{m.get('cpu_model', '?')} x{m.get('cpu_cores', '?')}"]
    if load:
        parts.append(f"load1 {load.get('load1_mean', '?')}")
    return " | ".join(parts)


def ttft_distribution(report: dict, path) -> Path:
    names = list(report.get("configs", {}))
    names += [f"evict_{p}" for p in report.get("policies", {})]
    data = [_finite(r["ttft_s"] for r in report["requests"].get(n, [])) for n in names]
    keep = [(n, d) for n, d in zip(names, data) if d]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(keep) + 2), 4.8))
    if keep:
        labels, vals = zip(*keep)
        box = ax.boxplot(vals, whis=(5, 95), showfliers=False, patch_artist=True)
        for i, (n, d) in enumerate(keep, start=1):
            box["boxes"][i - 1].set_facecolor(POLICY_COLOR if n.startswith("evict_") else MAIN_COLOR)
            box["boxes"][i - 1].set_alpha(0.45)
            jitter = [i + 0.18 * ((j * 7919) % 11 / 10 - 0.5) for j in range(len(d))]
            ax.scatter(jitter, d, s=9, color="black", alpha=0.55, zorder=3)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
        ax.set_yscale("log")
    ax.set_ylabel("TTFT per request (s, log scale)")
    ax.set_title("TTFT distribution (box: p25-p75, whiskers p5-p95, dots: requests)\n" + _subtitle(report),
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3, which="both")
    return _save(fig, path)


def _bar_labels(ax, bars, fmt: str) -> None:
    for b in bars:
        h = b.get_height()
        if not math.isnan(h):
            ax.annotate(fmt.format(h), (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")


def throughput(report: dict, path) -> Path:
    stats = report.get("configs", {})
    names = list(stats)
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(names) + 4), 4.2))
    for ax, key, label in ((axes[0], "requests_per_s", "requests / s"),
                           (axes[1], "output_tokens_per_s", "output tokens / s")):
        vals = [stats[n].get(key, math.nan) for n in names]
        bars = ax.bar(names, vals, color=MAIN_COLOR)
        _bar_labels(ax, bars, "{:.2f}")
        ratios = [stats[n].get("throughput_ratio_vs_vllm") for n in names]
        if key == "requests_per_s" and all(r is not None for r in ratios):
            ax.set_xticks(range(len(names)), [f"{n}\n({r:.2f}x vLLM)" for n, r in zip(names, ratios)])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")  # six names do not fit level
    fig.suptitle("Throughput per configuration (same trace)\n" + _subtitle(report), fontsize=9)
    return _save(fig, path)


def policies(report: dict, path) -> Path:
    stats = report.get("policies", {})
    names = list(stats)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(names) + 4), 4.2))
    hits = [100 * stats[n].get("kvplug_hit_rate", math.nan) for n in names]
    bars = axes[0].bar(names, hits, color=POLICY_COLOR)
    _bar_labels(axes[0], bars, "{:.1f}%")
    axes[0].set_ylabel("kvplug hit rate (% of looked-up tokens)")
    axes[0].set_ylim(0, max([10.0] + _finite(hits)) * 1.15)
    x = range(len(names))
    p50 = [stats[n].get("ttft_p50_s", math.nan) for n in names]
    p90 = [stats[n].get("ttft_p90_s", math.nan) for n in names]
    b1 = axes[1].bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color=POLICY_COLOR)
    b2 = axes[1].bar([i + 0.2 for i in x], p90, width=0.4, label="p90", color="#8C4A1F")
    _bar_labels(axes[1], list(b1) + list(b2), "{:.2f}")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("TTFT (s)")
    axes[1].set_ylim(0, max([1.0] + _finite(p50 + p90)) * 1.25)  # headroom: the legend clears the bars
    axes[1].legend(fontsize=8, loc="upper left", ncols=2)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    frac = report.get("sizing", {}).get("evict_cpu_frac")
    n_req = report.get("workload", {}).get("eviction_requests")
    fig.suptitle(f"Eviction policies, CPU tier = {frac} x working set, same {n_req}-request trace\n"
                 + _subtitle(report), fontsize=9)
    return _save(fig, path)


def blend(report: dict, path) -> Path:
    stats = report.get("blend", {})
    names = list(stats)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(names) + 3), 4.2))
    x = range(len(names))
    hit = [100 * stats[n].get("blend_chunk_hit_rate", math.nan) for n in names]
    rec = [100 * stats[n].get("blend_recomputed_frac", math.nan) for n in names]
    b1 = ax.bar([i - 0.2 for i in x], hit, width=0.4, label="chunk hit rate", color=MAIN_COLOR)
    b2 = ax.bar([i + 0.2 for i in x], rec, width=0.4, label="recomputed fraction", color=POLICY_COLOR)
    _bar_labels(ax, list(b1) + list(b2), "{:.1f}%")
    reqs = [stats[n].get("blend_requests", 0) for n in names]
    ax.set_xticks(list(x), [f"{n}\n({r:.0f} blended req)" for n, r in zip(names, reqs)])
    ax.set_ylabel("% (hits / chunk lookups; recomputed / blended tokens)")
    ax.set_ylim(0, 115)
    ax.legend(fontsize=8, loc="upper right", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Blending per configuration (same trace)\n" + _subtitle(report), fontsize=9)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: dict, prefix: str) -> list[Path]:
    out = [ttft_distribution(report, f"{prefix}ttft.png"), throughput(report, f"{prefix}throughput.png")]
    if report.get("policies"):
        out.append(policies(report, f"{prefix}policies.png"))
    if report.get("blend"):
        out.append(blend(report, f"{prefix}blend.png"))
    return out


_FRONTIER_ROWS = (("kl_mean", "first-token KL vs full prefill", True),
                  ("loglik_gap_mean", "gold answer log-lik gap per token", False),
                  ("accuracy", "accuracy against gold", False))


def blend_frontier(report: dict, path) -> Path:
    """Quality against TTFT ratio (vs vLLM alone's full prefill) per policy: each policy's ratios
    joined by a line, concat (ratio 0) and ratio 1.0 as shared black points, full prefill and the
    bf16 noise floor as horizontal lines."""
    fams = list(report["families"])
    fig, axes = plt.subplots(len(_FRONTIER_ROWS), len(fams), figsize=(6.0 * len(fams), 3.4 * len(_FRONTIER_ROWS)),
                             squeeze=False)
    for col, fam in enumerate(fams):
        f = report["families"][fam]
        for row, (key, label, log) in enumerate(_FRONTIER_ROWS):
            _frontier_panel(axes[row][col], f, key, label, log)
        axes[0][col].set_title(f"{fam} ({f['n_questions']} questions)", fontsize=10)
        axes[0][col].legend(fontsize=7)
    return _save(fig, path)


def _frontier_panel(ax, fam_report: dict, key: str, label: str, log: bool) -> None:
    cfg = fam_report["configs"]
    for p in sorted({c["policy"] for c in cfg.values()} - {"any"}):
        line = sorted((c for c in cfg.values() if c["policy"] == p and not c["config"].startswith("full")
                       and c.get(key) is not None), key=lambda c: c["ttft_ratio_vs_full"])
        if line:
            ax.plot([c["ttft_ratio_vs_full"] for c in line], [c[key] for c in line], marker="o", ms=4, label=p)
        for c in line:
            ax.annotate(f"{c['ratio']:g}", (c["ttft_ratio_vs_full"], c[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for name, marker, text in (("concat", "s", "ratio 0 (concat)"), ("ratio_1", "D", "ratio 1.0")):
        c = cfg.get(name)
        if c is not None and c.get(key) is not None:
            ax.scatter([c["ttft_ratio_vs_full"]], [c[key]], color="black", marker=marker, zorder=3, label=text)
    ref = cfg.get(fam_report["reference"], {})
    if ref.get(key) is not None:
        ax.axhline(ref[key], color="black", ls="--", lw=1, label="full prefill")
    noise = fam_report.get("noise_floor", {}).get("kl_mean" if key == "kl_mean" else "loglik_gap_abs_mean")
    if key != "accuracy" and noise:
        ax.axhline(noise, color="grey", ls=":", lw=1, label="bf16 noise floor (|gap| for log-lik)")
    if log:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("TTFT / vLLM full prefill (p50)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
