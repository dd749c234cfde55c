"""Soak: `vllm serve` with kvplug under concurrent load for a bounded time (loopback only), with tiers far
smaller than the working set, so every tier evicts all the time.

    KVPLUG_SOAK_SECONDS   how long the load runs (default 100; CI time: the whole file takes ~3 min)
    KVPLUG_SOAK_POLICY    eviction_policy of both tiers (default s3fifo)

Working set: 20 prompts of ~3 blocks (4 families sharing ~2 blocks of prefix) = ~28 distinct blocks, against
a CPU tier of 6 blocks, a disk tier of 10 and a vLLM KV cache of 20 blocks (so vLLM's own prefix cache
cannot hold it either and kvplug's tiers serve hits). Checks: no request fails; the disk directory never
exceeds disk_bytes + one unit; the server's RSS (all its processes) stays under a cap derived from its
RSS after warm-up plus cpu_bytes; every response to a sampled prompt equals vLLM alone's greedy output
(float32 tiny model: exact). Numbers seen are printed (pytest -s) and written to soak.json in tmp_path.
"""
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from fault_helpers import SOAK_SAMPLE, shared_baseline, soak_prompts
from test_offload_e2e import ENV, free_port, model, served_counter, unit_bytes, wait_healthy  # noqa: F401

pytestmark = pytest.mark.e2e
SECONDS = float(os.environ.get("KVPLUG_SOAK_SECONDS", "100"))
POLICY = os.environ.get("KVPLUG_SOAK_POLICY", "s3fifo")
CLIENTS, MAX_TOKENS, KV_BLOCKS = 4, 12, 20
# Allocator noise, request buffers, Prometheus history: generous on purpose. Measured on this load: vLLM
# alone grows ~185 MB over its first 3000 requests, and with kvplug the same (~175 MB).
RSS_SLACK = 512 << 20


def _rss(proc) -> int:
    import psutil

    try:
        p = psutil.Process(proc.pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _disk_bytes(root: Path) -> int:
    total = 0
    for f in list(root.glob("??/*")):
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            pass  # evicted between listing and stat
    return total


def _serve(model: str, extra: dict, tmp_path: Path):
    port = free_port()
    cfg = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1", "--port", str(port),
         "--enforce-eager", "--max-model-len", "1024", "--dtype", "float32", "--seed", "0",
         "--num-gpu-blocks-override", str(KV_BLOCKS), "--kv-transfer-config", json.dumps(cfg)],
        stdout=log, stderr=subprocess.STDOUT, env=ENV)
    return proc, f"http://127.0.0.1:{port}"


def test_soak_concurrent_requests_with_tiny_tiers(model, unit_bytes, tmp_path, tmp_path_factory):
    from openai import OpenAI

    baseline = shared_baseline(tmp_path_factory, model)
    want = {i: baseline[f"soak{i}"][0]["texts"][baseline[f"soak{i}"][1]] for i in SOAK_SAMPLE}
    pool = soak_prompts()
    disk = tmp_path / "disk"
    extra = {"cpu_bytes": 6 * unit_bytes, "disk_path": str(disk), "disk_bytes": 10 * unit_bytes,
             "eviction_policy": POLICY}
    # One unit in flight (a temp file being written) of slack. The tier budgets payload bytes, so each
    # file's ~240-byte header comes on top: 10 units' headers fit in the 4 KiB allowance.
    disk_cap = extra["disk_bytes"] + unit_bytes + 4096

    proc, url = _serve(model, extra, tmp_path)
    try:
        wait_healthy(proc, url, tmp_path / "serve.log")
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0)

        def ask(i: int) -> str:
            return client.completions.create(model=model, prompt=pool[i], max_tokens=MAX_TOKENS,
                                             temperature=0).choices[0].text
        for i in range(len(pool)):  # warm-up: every prompt once, so RSS is measured after first-use allocations
            ask(i)
        rss_start = _rss(proc)
        rss_cap = rss_start + extra["cpu_bytes"] + RSS_SLACK

        stop_at = time.monotonic() + SECONDS
        done, failures, wrong = [0] * CLIENTS, [], []
        samples = {"rss_max": rss_start, "disk_max": 0, "n": 0, "rss_mb_every_10s": []}

        def client_loop(c: int) -> None:
            rng = random.Random(c)
            while time.monotonic() < stop_at and done[c] < 100_000:
                i = rng.randrange(len(pool))
                try:
                    text = ask(i)
                except Exception as e:  # any failure is a test failure, reported below
                    failures.append(f"client {c} prompt {i}: {type(e).__name__}: {e}")
                    continue
                done[c] += 1
                if i in want and text != want[i]:
                    wrong.append((i, text, want[i]))

        def sampler() -> None:
            while time.monotonic() < stop_at and samples["n"] < 100_000:
                rss = _rss(proc)
                samples["rss_max"] = max(samples["rss_max"], rss)
                if samples["n"] % 20 == 0:
                    samples["rss_mb_every_10s"].append(round(rss / 2**20))
                samples["disk_max"] = max(samples["disk_max"], _disk_bytes(disk))
                samples["n"] += 1
                time.sleep(0.5)

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(CLIENTS)]
        threads.append(threading.Thread(target=sampler))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SECONDS + 300)
        assert not any(t.is_alive() for t in threads), "a client thread did not finish"
        for i in SOAK_SAMPLE:  # and once more, quietly, after the storm
            text = ask(i)
            if text != want[i]:
                wrong.append((i, text, want[i]))
        time.sleep(6)  # counters reach /metrics with the engine's next stats interval (5 s)
        counters = {n: served_counter(url, n) for n in ("saved_blocks", "cpu_hit_tokens", "disk_hit_tokens",
                                                         "cpu_evictions", "disk_evictions", "load_errors",
                                                         "disk_write_errors", "miss_tokens")}
        rss_end = _rss(proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    report = {"seconds": SECONDS, "policy": POLICY, "requests": sum(done), "failures": len(failures),
              "wrong": len(wrong), "rss_start_mb": rss_start / 2**20, "rss_max_mb": samples["rss_max"] / 2**20,
              "rss_end_mb": rss_end / 2**20, "rss_cap_mb": rss_cap / 2**20, "disk_max_bytes": samples["disk_max"],
              "disk_cap_bytes": disk_cap, "samples": samples["n"], "rss_mb_every_10s": samples["rss_mb_every_10s"],
              "counters": counters}
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=1))
    print("soak:", json.dumps(report))
    assert not failures, failures[:5]
    assert not wrong, wrong[:3]
    assert sum(done) >= CLIENTS and samples["n"] > 0
    assert samples["disk_max"] <= disk_cap, report
    assert samples["rss_max"] <= rss_cap, report
    # The tiers really were too small: both evicted, and both served hits.
    assert counters["cpu_evictions"] > 0 and counters["disk_evictions"] > 0, counters
    assert counters["cpu_hit_tokens"] > 0 and counters["disk_hit_tokens"] > 0, counters
