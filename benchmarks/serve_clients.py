"""Streaming clients and per-run statistics shared by the serve benchmarks (no server start here).

    Timed                               one request's timings (TTFT, chunk times, tokens, error)
    itl_from_chunks(chunk_times)        mean gap between streamed chunks after the first
    stream_timed(client, model, req, index, t_run, body=None)   one greedy streaming completion
    run_trace(url, model, trace, concurrency, desc, bodies=None) -> (results, wall_s)
    warm_pass(url, model, prompts, concurrency, bodies=None)    untimed prefill of prompts (1 token each)
    aggregate(results, wall_s)          TTFT/ITL percentiles and throughput of one run
    hit_rates(kvplug, prefix_cache)     hit rates per tier from counter deltas
    blend_summary(kvplug)               blend counters and their rates
    with_ratios(stats, base)            ratios vs vLLM alone
    scrape(url) / scrape_delta(url, before)   kvplug and vLLM prefix-cache counters from /metrics
    kvplug_origin(env, cwd)             the folder `import kvplug` resolves to for a server's env
    LoadSampler                         the machine's load average sampled in a thread
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402
from workloads import Request  # noqa: E402


# ---------------------------------------------------------------- clients
@dataclass
class Timed:
    index: int
    start_s: float  # since the run started
    ttft_s: float | None = None
    total_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # since the request was sent
    n_tokens: int = 0
    prompt_tokens: int | None = None
    text: str = ""
    error: str | None = None


def itl_from_chunks(chunk_times: list[float]) -> float | None:
    """Mean gap between consecutive streamed chunks after the first; None under two chunks."""
    if len(chunk_times) < 2:
        return None
    return (chunk_times[-1] - chunk_times[0]) / (len(chunk_times) - 1)


def stream_timed(client, model: str, req: Request, index: int, t_run: float, body: dict | None = None) -> Timed:
    """One greedy streaming completion, ignore_eos so every configuration decodes max_tokens.
    body: extra request fields (cache_salt, kv_transfer_params)."""
    t0 = time.perf_counter()
    out = Timed(index=index, start_s=t0 - t_run)
    parts = []
    try:
        stream = client.completions.create(
            model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **(body or {})})
        for chunk in stream:
            if getattr(chunk, "usage", None):
                out.prompt_tokens = chunk.usage.prompt_tokens
            if chunk.choices and chunk.choices[0].text:
                out.chunk_times.append(time.perf_counter() - t0)
                parts.append(chunk.choices[0].text)
    except Exception as e:  # a failed request is counted, never aborts the run
        out.error = f"{type(e).__name__}: {e}"
    out.total_s = time.perf_counter() - t0
    out.ttft_s = out.chunk_times[0] if out.chunk_times else None
    out.n_tokens, out.text = len(parts), "".join(parts)
    return out


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


def run_trace(url: str, model: str, trace: list[Request], concurrency: int, desc: str,
              bodies: list[dict] | None = None) -> tuple[list[Timed], float]:
    """Send the trace in order through `concurrency` client threads; returns results and wall s.
    bodies: per request, extra request fields (None: none)."""
    from openai import OpenAI

    local, lock, bar = threading.local(), threading.Lock(), _progress(len(trace), desc)
    t_run = time.perf_counter()

    def one(i: int) -> Timed:
        if not hasattr(local, "client"):
            local.client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
        res = stream_timed(local.client, model, trace[i], i, t_run, bodies[i] if bodies else None)
        with lock:
            if bar is not None:
                bar.set_postfix_str(f"ttft {res.ttft_s or float('nan'):.2f}s", refresh=False)
                bar.update(1)
            else:
                print(f"  [{desc}] {i + 1}/{len(trace)} ttft {res.ttft_s or float('nan'):.3f} s", flush=True)
        return res

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(len(trace))))
    wall = time.perf_counter() - t_run
    if bar is not None:
        bar.close()
    return results, wall


# ---------------------------------------------------------------- statistics
def aggregate(results: list[Timed], wall_s: float) -> dict:
    """Latency percentiles, ITL and throughput of one configuration's run."""
    ok = [r for r in results if r.error is None and r.ttft_s is not None]
    ttft = [r.ttft_s for r in ok]
    itl = [x for x in (itl_from_chunks(r.chunk_times) for r in ok) if x is not None]
    out_tok = sum(r.n_tokens for r in ok)
    prompt_tok = sum(r.prompt_tokens or 0 for r in ok)
    pct = serving.percentile
    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": wall_s,
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
            "ttft_mean_s": sum(ttft) / len(ttft) if ttft else float("nan"),
            "itl_mean_s": sum(itl) / len(itl) if itl else float("nan"),
            "itl_p50_s": pct(itl, 50), "itl_p90_s": pct(itl, 90),
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else float("nan"),
            "output_tokens_per_s": out_tok / wall_s if wall_s > 0 else float("nan"),
            "prompt_tokens_per_s": prompt_tok / wall_s if wall_s > 0 else float("nan"),
            "output_tokens": out_tok, "prompt_tokens": prompt_tok}


def hit_rates(kv: dict, prefix: dict) -> dict:
    """kvplug: tier hit tokens / lookup tokens (lookups are tokens beyond vLLM's own prefix
    cache); vLLM: prefix-cache hit tokens / queried tokens."""
    lookup = kv.get("lookup_tokens", 0.0)
    hits = {t: kv.get(f"{t}_hit_tokens", 0.0) for t in ("cpu", "disk", "remote")}
    out = {f"{t}_hit_rate": serving.ratio(h, lookup) for t, h in hits.items()}
    out["kvplug_hit_rate"] = serving.ratio(sum(hits.values()), lookup)
    out["vllm_prefix_hit_rate"] = serving.ratio(prefix.get("hits", 0.0), prefix.get("queries", 0.0))
    out["lookup_tokens"], out["hit_tokens"] = lookup, sum(hits.values())
    return out


BLEND_COUNTERS = ("blend_requests", "blend_tokens", "blend_recomputed_tokens", "blend_chunk_hits",
                  "blend_chunk_misses", "blend_errors", "blend_seconds")


def blend_summary(kv: dict) -> dict:
    """Blend counters of one run (0 when the server does not blend) and their rates: chunk hit
    rate = chunk hits / (hits + misses), recomputed fraction = recomputed / blended tokens,
    blend seconds per blended request; NaN where the denominator is 0."""
    out = {k: kv.get(k, 0.0) for k in BLEND_COUNTERS}
    hits, misses = out["blend_chunk_hits"], out["blend_chunk_misses"]
    out["blend_chunk_hit_rate"] = serving.ratio(hits, hits + misses)
    out["blend_recomputed_frac"] = serving.ratio(out["blend_recomputed_tokens"], out["blend_tokens"])
    out["blend_s_per_request"] = serving.ratio(out["blend_seconds"], out["blend_requests"])
    return out


def with_ratios(stats: dict, base: dict) -> dict:
    return {**stats, "throughput_ratio_vs_vllm": serving.ratio(stats["requests_per_s"], base["requests_per_s"]),
            "tokens_per_s_ratio_vs_vllm": serving.ratio(stats["output_tokens_per_s"], base["output_tokens_per_s"]),
            "ttft_p90_ratio_vs_vllm": serving.ratio(stats["ttft_p90_s"], base["ttft_p90_s"]),
            "ttft_p50_ratio_vs_vllm": serving.ratio(stats["ttft_p50_s"], base["ttft_p50_s"])}



def warm_pass(url: str, model: str, prompts: list[str], concurrency: int, desc: str,
              bodies: list[dict] | None = None) -> list[Timed]:
    """Each prompt once with max_tokens=1, untimed: its KV is computed and saved by the server
    before a timed trace (the oracle's perfect cache, the neighbours case's stored contexts)."""
    reqs = [Request(prompt=p, session=f"warm-{i}", round=0, doc_ids=(), max_tokens=1) for i, p in enumerate(prompts)]
    results, _ = run_trace(url, model, reqs, concurrency, desc, bodies)
    for r in results:
        if r.error:
            print(f"  [{desc}] warm-up request {r.index} failed: {r.error}", flush=True)
    return results


def scrape(url: str) -> dict:
    import requests

    text = requests.get(f"{url}/metrics", timeout=10).text
    return {"kvplug": serving.parse_kvplug_counters(text),
            "prefix_cache": serving.parse_kvplug_counters(text, prefix="vllm:prefix_cache_")}


def scrape_delta(url: str, before: dict) -> tuple[dict, dict]:
    """(counters now, their change since `before`), once the engine's counters have settled:
    they reach /metrics with its log interval, not with each request."""
    serving.scrape_settled(url, quiet_s=3.0, max_wait_s=20.0)
    after = scrape(url)
    return after, {k: serving.counter_delta(after[k], before[k]) for k in after}


def kvplug_origin(env: dict, cwd: str | os.PathLike) -> str:
    """The folder `import kvplug` resolves to with a server's environment and working directory:
    the proof that a server runs the kvplug it is meant to (the working tree, or an old revision
    first on PYTHONPATH) rather than the editable install's."""
    code = "import kvplug, os; print(os.path.dirname(os.path.abspath(kvplug.__file__)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    return out.stdout.strip() if out.returncode == 0 else f"(import failed: {out.stderr.strip()[-300:]})"

class LoadSampler:
    """os.getloadavg() every `every_s` seconds in a daemon thread: other jobs share the machine."""

    def __init__(self, every_s: float = 5.0):
        self.samples: list[tuple[float, float]] = []
        self._stop, self._every = threading.Event(), every_s
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, os.getloadavg()[0]))
            self._stop.wait(self._every)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def summary(self, since_s: float = 0.0) -> dict:
        xs = [v for t, v in self.samples if t >= since_s]
        if not xs:
            return {}
        return {"load1_min": min(xs), "load1_mean": round(sum(xs) / len(xs), 2), "load1_max": max(xs)}
