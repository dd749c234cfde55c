"""One vLLM engine of the codec benchmark (benchmarks/codec.py), in its own process (vLLM's engine
core uses spawn; every configuration needs a fresh engine).

    spawn(name, spec, work, env, timeout_s) -> result    run `python codec_engine.py SPEC OUT`
    run_engine(spec, out_path)                           the child

SPEC: {model, extra (None: vLLM alone), warm: [[ids]], prompts: [{doc, round, ids}], phases: [name],
       disk_path, redis_url, expect_units, greedy_tokens}
Warm-up: every warm prompt once (vLLM alone: fills its prefix cache; kvplug: computed and saved to the
tiers, then the writes are awaited). Per phase ("ref": vLLM alone, its own prefix cache; "disk": kvplug
from disk; "remote": kvplug from Redis, the disk files deleted first) and prompt: kvplug phases reset
vLLM's prefix cache so the document comes from the tier; one timed 1-token generate (TTFT: vLLM's
first_token_latency, else the wall time); in the first phase also the full first-token distribution
(logprobs=-1) and a greedy continuation, both served from the KV that request left in vLLM's cache.
Distributions go to OUT + ".npz" (float32 [prompts, vocab]), the rest to OUT as JSON.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serving import counter_delta  # noqa: E402


def _metrics(llm) -> dict:
    return {m.name.removeprefix("vllm:"): float(m.value) for m in llm.get_metrics()
            if m.name.startswith(("vllm:kvplug_", "vllm:prefix_cache_")) and hasattr(m, "value")}


def _units(spec) -> int:
    """Units in the slowest-filled of the configured tiers."""
    counts = []
    if spec.get("disk_path"):
        counts.append(sum(1 for _ in Path(spec["disk_path"]).rglob("*.kvp")))
    if spec.get("redis_url"):
        import redis

        counts.append(redis.Redis.from_url(spec["redis_url"]).dbsize())
    return min(counts) if counts else 0


def _await_writes(spec, timeout_s: float = 120.0) -> int:
    """Until every tier holds the units the warm-up saved (the writers are asynchronous)."""
    deadline, n = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        n = _units(spec)
        if n >= spec["expect_units"]:
            break
        time.sleep(0.25)
    return n


def _distribution(output, vocab: int) -> np.ndarray:
    flat = output.outputs[0].logprobs
    lp = np.full(vocab, -np.inf, dtype=np.float32)
    s, e = flat.start_indices[0], flat.end_indices[0]
    lp[np.asarray(flat.token_ids[s:e])] = np.asarray(flat.logprobs[s:e], dtype=np.float32)
    return lp


def _phase(llm, spec, name: str, quality: bool, dists: list) -> dict:
    from vllm import SamplingParams

    one = SamplingParams(temperature=0, max_tokens=1)
    full = SamplingParams(temperature=0, max_tokens=1, logprobs=-1, flat_logprobs=True)
    greedy = SamplingParams(temperature=0, max_tokens=spec["greedy_tokens"])
    vocab = llm.llm_engine.model_config.get_vocab_size()
    m0, reqs = _metrics(llm), []
    for p in spec["prompts"]:
        if name != "ref":
            llm.reset_prefix_cache()
        m, t = _metrics(llm), time.perf_counter()
        o = llm.generate([{"prompt_token_ids": p["ids"]}], one, use_tqdm=False)[0]
        wall = time.perf_counter() - t
        first = getattr(o.metrics, "first_token_latency", 0.0) if o.metrics is not None else 0.0
        rec = {"doc": p["doc"], "round": p["round"], "prompt_tokens": len(p["ids"]), "ttft_s": first or wall,
               "wall_s": wall, "counters": counter_delta(_metrics(llm), m)}
        if quality:
            dists.append(_distribution(llm.generate([{"prompt_token_ids": p["ids"]}], full, use_tqdm=False)[0], vocab))
            g = llm.generate([{"prompt_token_ids": p["ids"]}], greedy, use_tqdm=False)[0]
            rec["greedy"] = list(g.outputs[0].token_ids)
        reqs.append(rec)
        print(f"  [{name}] doc {p['doc']} round {p['round']} ({len(p['ids'])} tok): ttft {rec['ttft_s']:.3f} s",
              flush=True)
    return {"name": name, "requests": reqs, "counters": counter_delta(_metrics(llm), m0)}


def run_engine(spec: dict, out_path: Path) -> None:
    from vllm import LLM, SamplingParams

    kwargs = {}
    if spec["extra"] is not None:
        kwargs["kv_transfer_config"] = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": spec["extra"]}
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], enforce_eager=True, dtype="bfloat16", seed=0, max_model_len=8192,
              enable_prefix_caching=True, max_logprobs=-1, disable_log_stats=False, **kwargs)
    result = {"engine_start_s": time.perf_counter() - t0, "phases": []}
    t0, m0 = time.perf_counter(), _metrics(llm)
    for ids in spec["warm"]:
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    result["warm"] = {"wall_s": time.perf_counter() - t0, "counters": counter_delta(_metrics(llm), m0)}
    if spec["extra"] is not None:
        result["warm"]["units_seen"] = _await_writes(spec)
        result["warm"]["await_s"] = time.perf_counter() - t0 - result["warm"]["wall_s"]
        result["tier_bytes"] = _tier_bytes(spec)
    dists: list = []
    for i, name in enumerate(spec["phases"]):
        if name == "remote" and spec.get("disk_path"):
            for f in Path(spec["disk_path"]).rglob("*.kvp"):
                f.unlink()
        result["phases"].append(_phase(llm, spec, name, i == 0, dists))
        out_path.write_text(json.dumps(result))
    np.savez_compressed(str(out_path) + ".npz", logprobs=np.stack(dists) if dists else np.zeros((0,)))
    result["complete"] = True
    out_path.write_text(json.dumps(result))


def _tier_bytes(spec) -> dict:
    out = {}
    if spec.get("disk_path"):
        files = list(Path(spec["disk_path"]).rglob("*.kvp"))
        out["disk_files"], out["disk_bytes"] = len(files), sum(f.stat().st_size for f in files)
    if spec.get("redis_url"):
        import redis

        client = redis.Redis.from_url(spec["redis_url"])
        keys = list(client.scan_iter(count=1000))
        out["remote_values"], out["remote_bytes"] = len(keys), sum(client.strlen(k) for k in keys)
    return out


def spawn(name: str, spec: dict, work: Path, env: dict, timeout_s: float) -> dict:
    spec_p, out_p, log_p = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_p.write_text(json.dumps(spec))
    out_p.unlink(missing_ok=True)
    print(f"== engine {name}: log {log_p}", flush=True)
    with open(log_p, "w") as log:
        # Its own session, killed as a group once the engine ends: vLLM's worker processes may outlive a
        # failed engine (holding its output open) or a timed-out one.
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec_p), str(out_p)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work,
                                start_new_session=True)
        reader = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = -9
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reader.join(timeout=30)
    res = json.loads(out_p.read_text()) if out_p.exists() else {"phases": []}
    if rc != 0 or not res.get("complete"):
        tail = [ln.strip() for ln in log_p.read_text(errors="replace").splitlines() if "rror" in ln][-3:]
        res["error"] = f"engine exited with rc={rc}: " + " | ".join(tail)
        print(f"ERROR engine {name}: {res['error']}", flush=True)
    else:
        res["logprobs"] = np.load(str(out_p) + ".npz")["logprobs"]
    return res


def _pump(stream, log) -> None:
    """The engine's output to its log; progress lines to the console too."""
    for line in stream:
        log.write(line)
        if line.startswith("  ["):
            print(line, end="", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    run_engine(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
