"""One vLLM engine of the blend benchmark, in its own process (vLLM's engine core uses spawn and
every engine needs a fresh process).

    spawn_engine(name, spec, work, env, timeout_s) -> result   run `python blend_engine.py SPEC OUT`
    run_engine(spec, out_path)                                  the child: the spec's phases, in order
    explain_failure(log, rc, extra) -> str                      one line on why an engine died

SPEC: {model, extra (None: no connector), max_model_len, dtype, engine_warmup_prompt,
phases: [{name, reset_each, repeat_cached, salt_each, kv_params, warmup, requests: [{id, prompt, max_tokens}]}]}.
Per request: one greedy generate with logprobs (the answer, its first-token logprobs, and the time
to first token from vLLM's request metrics), counter deltas. `repeat_cached`: the same prompt
again right after, without a reset, recorded as phase "<name>_cached" (vLLM served from its own
prefix cache: the noise floor of agreement). Results are written after every phase.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from blend_metrics import LOGPROBS  # noqa: E402
from serving import counter_delta  # noqa: E402


def _metrics(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith(("vllm:kvplug_", "vllm:prefix_cache_")) and hasattr(m, "value"):
            out[m.name.removeprefix("vllm:")] = float(m.value)
    return out


def _generate(llm, req: dict, kv_params, salt: str | None = None) -> dict:
    from vllm import SamplingParams

    extra = {"kv_transfer_params": dict(kv_params)} if kv_params else None
    sp = SamplingParams(temperature=0, max_tokens=req["max_tokens"], logprobs=LOGPROBS, extra_args=extra)
    prompt = req["prompt"] if salt is None else {"prompt": req["prompt"], "cache_salt": salt}
    m0, t = _metrics(llm), time.perf_counter()
    o = llm.generate([prompt], sp, use_tqdm=False)[0]
    wall = time.perf_counter() - t
    first = getattr(o.metrics, "first_token_latency", 0.0) if o.metrics is not None else 0.0
    out = o.outputs[0]
    return {"id": req["id"], "prompt_tokens": len(o.prompt_token_ids), "ttft_s": first or wall, "wall_s": wall,
            "ttft_source": "vllm first_token_latency" if first else "wall time of generate",
            "text": out.text, "first_token_logprobs": {str(tid): lp.logprob for tid, lp in out.logprobs[0].items()},
            "counters": counter_delta(_metrics(llm), m0)}


def run_engine(spec: dict, out_path: Path) -> None:
    from vllm import LLM, SamplingParams

    kwargs = {}
    if spec["extra"] is not None:
        kwargs["kv_transfer_config"] = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": spec["extra"]}
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], enforce_eager=True, dtype=spec.get("dtype", "bfloat16"), seed=0,
              max_model_len=spec["max_model_len"], enable_prefix_caching=True, disable_log_stats=False, **kwargs)
    result = {"engine_start_s": time.perf_counter() - t0, "phases": []}
    # One long request without separators so one-time lazy set-up is not charged to a timed request.
    llm.generate([spec["engine_warmup_prompt"]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    for ph in spec["phases"]:
        print(f"[{ph['name']}] {len(ph['requests'])} requests", flush=True)
        llm.reset_prefix_cache()  # no phase starts on what the one before left cached
        m_start, t_phase, reqs, cached = _metrics(llm), time.perf_counter(), [], []
        for req in ph["requests"]:
            if ph["reset_each"]:
                llm.reset_prefix_cache()
            # salt_each: a fresh tenant per request, so no tier of kvplug holds any of its KV
            rec = _generate(llm, req, ph["kv_params"], f"{ph['name']}/{req['id']}" if ph.get("salt_each") else None)
            reqs.append(rec)
            if ph.get("repeat_cached"):
                cached.append(_generate(llm, req, ph["kv_params"]))
            print(f"  [{ph['name']}] {req['id']}: ttft {rec['ttft_s']:.3f} s ({rec['prompt_tokens']} tok) "
                  f"-> {rec['text'][:40]!r}", flush=True)
        time.sleep(0.5)  # let the last step's stats land before the phase total
        result["phases"].append({"name": ph["name"], "wall_s": time.perf_counter() - t_phase, "warmup": ph["warmup"],
                                 "counters": counter_delta(_metrics(llm), m_start), "requests": reqs})
        if cached:
            result["phases"].append({"name": f"{ph['name']}_cached", "warmup": False, "counters": {},
                                     "requests": cached})
        out_path.write_text(json.dumps(result))
    result["complete"] = True
    out_path.write_text(json.dumps(result))


def spawn_engine(name: str, spec: dict, work: Path, env: dict, timeout_s: float) -> dict:
    """Run one engine; its output streams to work/<name>.log. The result has "error" set when it
    failed (the phases it finished are kept)."""
    spec_p, out_p, log_p = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_p.write_text(json.dumps(spec))
    out_p.unlink(missing_ok=True)
    print(f"== engine {name}: log {log_p}", flush=True)
    with open(log_p, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec_p), str(out_p)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work)
        deadline = time.monotonic() + timeout_s
        for line in proc.stdout:  # progress lines to the console, everything to the log
            log.write(line)
            if line.startswith(("[", "  [")):
                print(line, end="", flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                break
        rc = proc.wait()
    res = json.loads(out_p.read_text()) if out_p.exists() else {"phases": []}
    if rc != 0 or not res.get("complete"):
        res["error"] = explain_failure(log_p.read_text(errors="replace"), rc, spec["extra"])
        print(f"ERROR engine {name}: {res['error']}", flush=True)
    return res


def explain_failure(log: str, rc: int, extra: dict | None) -> str:
    lines = log.splitlines()
    unknown = [ln for ln in lines if "kv_connector_extra_config" in ln and ("unknown key" in ln or "no longer" in ln)]
    if unknown and extra:
        return "the connector rejected its keys: " + unknown[-1].split("ValueError:", 1)[-1].strip()
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    tail = errors[-3:] if errors else lines[-5:]
    return f"engine exited with rc={rc}: " + " | ".join(ln.strip() for ln in tail)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    run_engine(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
