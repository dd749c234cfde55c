"""kvplug's counters from a running vLLM server's Prometheus endpoint.

    metrics_url(url) -> str              normalise "host:port", "http://h:p" or ".../metrics"
    fetch_metrics(url, timeout_s) -> str the /metrics text; CliError if unreachable
    parse_counters(text) -> dict         vllm:kvplug_<name>_total samples summed over labels
    derived(counters) -> dict            hit ratio and friends, when the inputs are there

Standard library only (urllib): `kvplug stats --url` must work without vLLM installed.
"""
from __future__ import annotations

import urllib.error
import urllib.request

from kvplug.cli.common import CliError

PREFIX = "vllm:kvplug_"
SUFFIX = "_total"


def metrics_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/metrics") else url + "/metrics"


def fetch_metrics(url: str, timeout_s: float = 10.0) -> str:
    full = metrics_url(url)
    try:
        with urllib.request.urlopen(full, timeout=timeout_s) as resp:
            return resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        raise CliError(f"{full} answered HTTP {e.code}: is this a vLLM server (vllm serve)?") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(f"cannot reach {full}: {reason}; is the server running, and is the "
                       "host:port the one vllm serve listens on?") from None


def _sample(line: str) -> tuple[str, str] | None:
    """(metric name, value field) of one exposition line; labels may hold spaces and braces."""
    if "{" in line.split(" ", 1)[0]:
        name, rest = line.split("{", 1)[0], line.rsplit("}", 1)[-1]
    else:
        name, _, rest = line.partition(" ")
    fields = rest.split()
    return (name, fields[0]) if fields else None


def parse_counters(text: str) -> dict[str, float]:
    """{"cpu_hit_tokens": 384.0, ...}: every engine's (label set's) samples added up."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith(PREFIX):
            continue
        sample = _sample(line)
        if sample is None or not sample[0].endswith(SUFFIX):
            continue  # _created timestamps and anything that is not a counter total
        try:
            value = float(sample[1])
        except ValueError:
            continue
        name = sample[0][len(PREFIX):-len(SUFFIX)]
        out[name] = out.get(name, 0.0) + value
    return dict(sorted(out.items()))


def derived(c: dict[str, float]) -> dict[str, float]:
    """Ratios a reader wants first; omitted when their denominator is zero."""
    out = {}
    hits = sum(v for k, v in c.items() if k.endswith("_hit_tokens"))  # every tier, remote too
    if c.get("lookup_tokens"):
        out["hit_ratio"] = hits / c["lookup_tokens"]
    if c.get("load_seconds") and c.get("load_bytes"):
        out["load_GBps"] = c["load_bytes"] / c["load_seconds"] / 1e9
    return out
