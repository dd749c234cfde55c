"""One row of benchmarks/serve.py reproduced with `vllm bench serve` (vLLM's own client).

    bench_command(url, model, dataset, n, output_len, concurrency, salt, result_dir, name) -> argv
    run_bench(...) -> dict                  one `vllm bench serve` run: its requests/s, TTFT, errors
    check(url, model, requests, concurrency, work, env, rounds=2) -> dict
    compare(ours, theirs) -> dict           requests/s side by side, ratio and the runs' own spread
    print_result(res)

The requests go out as vLLM 0.32's custom dataset (workloads.write_vllm_custom: {"prompt",
"output_tokens"} per line) with --skip-chat-template --disable-shuffle --ignore-eos: the same
prompts in the same order, greedy (temperature 0), the same output length, --max-concurrency
= this script's client threads and every request sent at once (--request-rate inf), as
serve_clients.run_trace does. No readiness probe (--ready-check-timeout-sec 0): its probe would
send the first request once more before the run. On one server, the two clients alternate
(ours, vLLM's, ours, vLLM's), each run under a cache_salt of its own, so that no run reuses KV
another one computed: every run starts as cold as the first. The agreement is within noise when
|vLLM's requests/s / ours - 1| is at most the larger spread between two runs of one client.
vLLM's custom dataset reads its JSONL through pandas; without pandas the check records the error.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402
from serve_clients import aggregate, run_trace  # noqa: E402
from workloads import Request, write_vllm_custom  # noqa: E402


def bench_command(url: str, model: str, dataset: Path, n: int, output_len: int, concurrency: int, salt: str,
                  result_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-c", serving._LAUNCHER, "bench", "serve", "--backend", "vllm", "--base-url", url,
            "--endpoint", "/v1/completions", "--model", model, "--dataset-name", "custom",
            "--dataset-path", str(dataset), "--num-prompts", str(n), "--custom-output-len", str(output_len),
            "--skip-chat-template", "--disable-shuffle", "--ignore-eos", "--temperature", "0",
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ready-check-timeout-sec", "0",
            "--num-warmups", "0", "--extra-body", json.dumps({"cache_salt": salt}), "--disable-tqdm",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", name]


def run_bench(url: str, model: str, dataset: Path, n: int, output_len: int, concurrency: int, salt: str,
              work: Path, env: dict, timeout_s: float = 3600) -> dict:
    name = f"vllm_bench_{salt}.json"
    cmd = bench_command(url, model, dataset, n, output_len, concurrency, salt, work, name)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=timeout_s)
    out = {"salt": salt, "command": cmd[3:], "process_s": time.monotonic() - t0, "returncode": proc.returncode}
    path = work / name
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout)[-1500:]
        note = " (vLLM's custom dataset needs pandas: pip install pandas)" if "pandas" in tail else ""
        return {**out, "error": f"vllm bench serve failed{note}: {tail}"}
    res = json.loads(path.read_text())
    errors = [e for e in res.get("errors", []) if e]
    return {**out, "requests_per_s": res["request_throughput"], "duration_s": res["duration"],
            "completed": res["completed"], "failed": res.get("failed", len(errors)),
            "ttft_mean_s": res["mean_ttft_ms"] / 1000, "ttft_p50_s": res["median_ttft_ms"] / 1000,
            "total_input_tokens": res["total_input_tokens"], "total_output_tokens": res["total_output_tokens"],
            "errors": errors[:3]}


def run_ours(url: str, model: str, requests: list[Request], concurrency: int, salt: str) -> dict:
    results, wall = run_trace(url, model, requests, concurrency, f"ours {salt}",
                              bodies=[{"cache_salt": salt}] * len(requests))
    s = aggregate(results, wall)
    return {"salt": salt, "requests_per_s": s["requests_per_s"], "duration_s": wall,
            "completed": s["requests"] - s["errors"], "failed": s["errors"], "ttft_mean_s": s["ttft_mean_s"],
            "ttft_p50_s": s["ttft_p50_s"], "total_input_tokens": s["prompt_tokens"],
            "total_output_tokens": s["output_tokens"]}


def _spread(runs: list[dict]) -> float:
    """(max - min) / mean of the runs' requests/s: NaN under two runs."""
    xs = [r["requests_per_s"] for r in runs]
    return (max(xs) - min(xs)) / (sum(xs) / len(xs)) if len(xs) > 1 and sum(xs) else float("nan")


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    """Mean requests/s of each client, vLLM's / ours, and whether that is within the runs' own noise."""
    ok = [r for r in theirs if "error" not in r]
    if not ours or not ok:
        return {"ours": ours, "vllm_bench": theirs, "ratio": None, "within_noise": None,
                "note": "no successful vllm bench serve run" if ours else "no run of this script's clients"}
    mean = lambda runs: sum(r["requests_per_s"] for r in runs) / len(runs)  # noqa: E731
    ratio = mean(ok) / mean(ours) if mean(ours) else float("nan")
    noise = max(_spread(ours), _spread(ok))
    return {"ours": ours, "vllm_bench": theirs, "ours_requests_per_s": mean(ours),
            "vllm_bench_requests_per_s": mean(ok), "ratio": ratio, "noise": noise,
            "within_noise": (abs(ratio - 1) <= noise) if noise == noise else None,
            "ttft_mean_ratio": (sum(r["ttft_mean_s"] for r in ok) / len(ok))
            / (sum(r["ttft_mean_s"] for r in ours) / len(ours))}


def check(url: str, model: str, requests: list[Request], concurrency: int, work: Path, env: dict,
          rounds: int = 2, config: str = "") -> dict:
    """Alternate this script's clients and `vllm bench serve` `rounds` times on one server
    (nothing runs when vLLM's custom dataset cannot be read: pandas missing)."""
    head = {"config": config, "requests": len(requests), "concurrency": concurrency, "rounds": rounds}
    probe = subprocess.run([sys.executable, "-c", "import pandas"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        note = "vllm bench serve's custom dataset reads JSONL with pandas, which this environment lacks: pip install pandas"
        print(f"  [vllm bench] skipped: {note}", flush=True)
        return {**head, "ours": [], "vllm_bench": [], "ratio": None, "within_noise": None, "note": note}
    dataset = work / "vllm_bench_trace.jsonl"
    write_vllm_custom(requests, dataset)
    lengths = sorted({r.max_tokens for r in requests})
    if len(lengths) != 1:
        raise ValueError(f"the requests ask for {lengths} output tokens: vllm bench serve takes one length")
    ours, theirs, tag = [], [], time.monotonic_ns()
    for i in range(rounds):
        ours.append(run_ours(url, model, requests, concurrency, f"ours-{i}-{tag}"))
        theirs.append(run_bench(url, model, dataset, len(requests), lengths[0], concurrency, f"bench-{i}-{tag}",
                                work, env))
        if "error" in theirs[-1]:
            print(f"  [vllm bench] {theirs[-1]['error'][-400:]}", flush=True)
    return {**head, **compare(ours, theirs)}


def print_result(res: dict) -> None:
    print(f"\nvllm bench serve vs this script on {res['config']} ({res['requests']} requests, concurrency "
          f"{res['concurrency']}, {res['rounds']} alternating rounds)")
    rows = [{"client": "this script", "run": i, **r} for i, r in enumerate(res["ours"])]
    rows += [{"client": "vllm bench serve", "run": i, **r} for i, r in enumerate(res["vllm_bench"])]
    serving.print_table(rows, ["client", "run", "requests_per_s", "ttft_mean_s", "completed", "failed", "error"])
    if res.get("ratio") is not None:
        print(f"vllm bench / this script requests/s {res['ratio']:.3f}; spread between runs of one client "
              f"{res['noise']:.3f}; within noise: {res['within_noise']}")
    else:
        print(f"no comparison: {res.get('note')}")
