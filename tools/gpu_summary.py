"""The gpu-check's reading of benchmarks/kernels.py's JSON against issue 12's targets, of
tools/blend_gpu.py's JSON, and its one-screen summary. Targets are benchmarks, never tests: a
miss is reported, it fails nothing.

Methods:
    TARGETS                           (label, ops, case pattern, metric, threshold)
    evaluate(bench) -> list[dict]     per target: best GPU backend's row, its value, pass/miss/n/a
    peers(bench) -> list[str]         lines on the block path vs the opaque path and on LMCache
    econ_line(econ) -> str            blend TTFT / full prefill per prompt and ratio, one line
    summary(report) -> str            the one screen gpu_check prints and writes
"""
from __future__ import annotations

import re
import textwrap

# (label, ops, case name pattern (the largest case when none matches), metric, threshold)
TARGETS = [
    ("gather/scatter >= 80% of copy bw", ("gather_chunks", "scatter_chunks"), r"T32768", "pct_ceiling", 80.0),
    ("re-RoPE+scatter >= 80% of copy bw", ("rerotate_and_scatter",), r"T32768", "pct_ceiling", 80.0),
    ("deviation top-k 32K tok >= 10x torch", ("deviation_topk",), r"T32768", "x_torch", 10.0),
    ("k-means iteration >= 5x torch", ("kmeans_step",), r"T32768", "x_torch", 5.0),
    ("centroid top-k 32K keys >= 5x torch", ("centroid_topk",), r"^Q1 C2048 ", "x_torch", 5.0),
]
KERNEL_BACKENDS = ("cuda", "triton")


def _rows(bench: dict, op: str) -> list[dict]:
    return [r for r in bench.get("results", []) if r["op"] == op]


def _case_rows(rows: list[dict], pattern: str) -> tuple[list[dict], bool]:
    """Rows of the case matching pattern, or of the last (largest) case; and whether it matched."""
    hit = [r for r in rows if re.search(pattern, r["case"])]
    if hit:
        return hit, True
    last = rows[-1]["case"] if rows else None
    return [r for r in rows if r["case"] == last], False


def evaluate(bench: dict) -> list[dict]:
    on_gpu = bench.get("device", "cpu") != "cpu"
    out = []
    for label, ops, pattern, metric, threshold in TARGETS:
        for op in ops:
            rows, matched = _case_rows(_rows(bench, op), pattern)
            kernels = [r for r in rows if r["backend"] in KERNEL_BACKENDS and r.get(metric) is not None]
            best = max(kernels, key=lambda r: r[metric], default=None)
            value = best[metric] if best else None
            if not on_gpu or not matched:
                verdict = "n/a"
            elif best is None:
                verdict = "MISS (no kernel row)"
            else:
                verdict = "PASS" if value >= threshold else "MISS"
            out.append(dict(target=label, op=op, case=rows[0]["case"] if rows else None, threshold=threshold,
                            metric=metric, backend=best["backend"] if best else None, value=value,
                            GBps=best.get("GBps") if best else None, verdict=verdict))
    return out


def _best(rows: list[dict], backends) -> dict | None:
    return min((r for r in rows if r["backend"] in backends), key=lambda r: r["ms"], default=None)


def peers(bench: dict) -> list[str]:
    lines = []
    for op in ("save_blocks", "load_blocks"):
        rows, _ = _case_rows(_rows(bench, op), r"$^")
        mine, old = _best(rows, KERNEL_BACKENDS + ("torch",)), _best(rows, ("opaque",))
        if mine:
            vs = f", {old['ms'] / mine['ms']:.2f}x the opaque path's speed" if old else ""
            lines.append(f"{op:<12} {mine['backend']:<6} {mine.get('GBps', 0):8.1f} GB/s "
                         f"{mine.get('pct_ceiling', 0):5.1f}% of {mine.get('ceiling', '?')}{vs}")
    for op in ("gather_chunks", "scatter_chunks"):
        rows, _ = _case_rows(_rows(bench, op), r"$^")
        theirs, mine = _best(rows, ("lmcache",)), _best(rows, KERNEL_BACKENDS)
        if theirs and mine:
            lines.append(f"{op:<12} lmcache {theirs.get('GBps', 0):8.1f} GB/s, kvplug {mine['backend']} "
                         f"{theirs['ms'] / mine['ms']:.2f}x its speed")
    lines += [n for n in bench.get("notes", []) if "lmcache" in n][:1]
    return lines


def _fmt(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def econ_line(econ: dict) -> str:
    """e.g. "TTFT/full 4k: 0:0.05 0.05:0.12 ... | 16k: ..." from blend_gpu.json's headline."""
    head = econ.get("headline", {})
    parts = []
    for key, ratios in head.items():
        if key.startswith("ttft_ratio_") and isinstance(ratios, dict):
            cells = " ".join(f"{r}:{v:.3g}" for r, v in ratios.items())
            full = head.get(f"full_prefill_s_{key.removeprefix('ttft_ratio_')}")
            parts.append(f"{key.removeprefix('ttft_ratio_')} (full {_fmt(full and full * 1e3, '.0f')} ms) {cells}")
    layers = econ.get("setup", {}).get("layers_used")
    return ("TTFT/full " + " | ".join(parts) if parts else "no measurement") + (f"; {layers} layers" if layers else "")


def summary(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"kvplug gpu-check  mode {report['mode']}  device {report['device']}  torch {report['torch']}  "
             f"{report['seconds']:.0f} s of {report['budget_s']:.0f} s budget",
             f"CUDA {env.get('cuda')}  triton {env.get('triton')}  setuptools {env.get('setuptools')}  "
             f"missing: {', '.join(t for t, w in env.get('tools', {}).items() if not w) or 'nothing'}",
             *[ln for w in env.get("warnings", []) for ln in textwrap.wrap(f"WARNING: {w}", 118,
                                                                           subsequent_indent="  ")], "",
             f"{'part':<7} {'status':<7} {'time':>6}  detail"]
    for p in report["parts"]:
        lines.append(f"{p['name']:<7} {p['status']:<7} {p['seconds']:5.0f}s  {p['detail']}")
    if report.get("targets"):
        lines += ["", f"{'target':<38} {'op':<21} {'backend':<7} {'value':>8}  verdict"]
        for t in report["targets"]:
            unit = "%" if t["metric"] == "pct_ceiling" else "x"
            lines.append(f"{t['target']:<38} {t['op']:<21} {t['backend'] or '-':<7} "
                         f"{_fmt(t['value'], '.1f'):>7}{unit}  {t['verdict']}")
    if report.get("ceilings"):
        c = report["ceilings"]
        lines += ["", f"ceilings: copy {_fmt(c.get('copy_GBps'), '.0f')} GB/s, h2d {_fmt(c.get('h2d_GBps'), '.1f')}"
                  f" GB/s, d2h {_fmt(c.get('d2h_GBps'), '.1f')} GB/s, matmul {_fmt(c.get('matmul_TFLOPs'), '.1f')}"
                  " TFLOP/s"]
    lines += report.get("peers", [])
    if report.get("blend_econ", {}).get("headline"):
        lines += ["", "blend economics: " + econ_line(report["blend_econ"])]
    lines += ["", "files: " + ", ".join(report.get("files", []))]
    states = [p["status"] for p in report["parts"]]
    left = sum(s in ("pending", "running") for s in states)
    verdict = f"in progress: {left} parts to go" if left else \
        "all parts ok" if all(s in ("ok", "skip") for s in states) else "SOME PARTS FAILED OR TIMED OUT"
    return "\n".join(lines + [verdict])
