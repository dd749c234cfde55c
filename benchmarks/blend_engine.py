"""One vLLM engine of the blend benchmark, in its own process (vLLM's engine core uses spawn and
every engine needs a fresh process).

    spawn_engine(name, spec, work, env, timeout_s) -> result   run `python blend_engine.py SPEC OUT`
    run_engine(spec, out_path)                                  the child: the spec's phases, in order
    explain_failure(log, rc, extra) -> str                      one line on why an engine died

SPEC: {model, extra (None: no connector), max_model_len, dtype, engine_warmup_prompt, requests,
phases: [{name, reset_each, repeat_cached, salt_each, kv_params, warmup, forced,
requests: [{id, prompt, max_tokens, answer}] or "all" (the spec's top-level requests)}]}.
Per request: one greedy generate with the top-LOGPROBS logprobs of every generated token (the
answer, its first-token distribution, the time to first token from vLLM's request metrics),
counter deltas. `forced` ("fresh" or "reuse", phases whose requests carry a gold `answer`): the
answer's teacher-forced logprobs per token. When the greedy tokens begin with the answer's tokens
they are the generation's own logprobs ("generation"); otherwise a second request with the same
prompt, salt and kv_params whose output the ForceAnswer logits processor forces to the answer
(forced_answer.py): "fresh" after a prefix-cache reset (full prefill or blend again, the same
computation as the generation), "reuse" without one (served from vLLM's prefix cache).
`repeat_cached`: the same prompt again right after, without a reset, recorded as phase
"<name>_cached" with its answer forced by "reuse" (vLLM served from its own prefix cache: the
bf16 noise floor). Results are written after every phase.
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


def _params(kv_params, salt: str | None, extra: dict | None = None) -> dict:
    return {**({"kv_transfer_params": dict(kv_params)} if kv_params else {}), **(extra or {})}


def _prompt(req: dict, salt: str | None):
    return req["prompt"] if salt is None else {"prompt": req["prompt"], "cache_salt": salt}


def _generate(llm, req: dict, kv_params, salt: str | None = None) -> tuple[dict, list[int], list[dict]]:
    """The greedy generation's record, its token ids and its per-token logprob dicts."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=req["max_tokens"], logprobs=LOGPROBS,
                        extra_args=_params(kv_params, salt) or None)
    m0, t = _metrics(llm), time.perf_counter()
    o = llm.generate([_prompt(req, salt)], sp, use_tqdm=False)[0]
    wall = time.perf_counter() - t
    first = getattr(o.metrics, "first_token_latency", 0.0) if o.metrics is not None else 0.0
    out = o.outputs[0]
    lps = [{tid: lp.logprob for tid, lp in step.items()} for step in (out.logprobs or [])]
    rec = {"id": req["id"], "prompt_tokens": len(o.prompt_token_ids), "ttft_s": first or wall, "wall_s": wall,
           "ttft_source": "vllm first_token_latency" if first else "wall time of generate",
           "text": out.text, "first_token_logprobs": {str(t): v for t, v in (lps[0] if lps else {}).items()},
           "counters": counter_delta(_metrics(llm), m0)}
    return rec, list(out.token_ids), lps


def _force(llm, req: dict, kv_params, salt: str | None, ids: list[int]) -> tuple[list[float], dict]:
    """The forced answer's per-token logprobs (see forced_answer.py) and the request's counters."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=len(ids), logprobs=0, ignore_eos=True, detokenize=False,
                        extra_args=_params(kv_params, salt, {"force_token_ids": ids}))
    m0 = _metrics(llm)
    out = llm.generate([_prompt(req, salt)], sp, use_tqdm=False)[0].outputs[0]
    if list(out.token_ids) != ids:
        raise RuntimeError(f"{req['id']}: forced {ids}, got {list(out.token_ids)}: the logits processor did not act")
    return [step[t].logprob for step, t in zip(out.logprobs, ids)], counter_delta(_metrics(llm), m0)


def _answer(llm, rec: dict, req: dict, kv_params, salt, mode: str, gen_ids: list[int], lps: list[dict]) -> None:
    """Add the gold answer's teacher-forced logprobs to a generation's record (see the docstring)."""
    ids = llm.get_tokenizer().encode(req["answer"], add_special_tokens=False)
    if gen_ids[:len(ids)] == ids:
        rec.update(answer_logprobs=[lp[t] for lp, t in zip(lps, ids)], forced_from="generation")
        return
    if mode == "fresh":
        llm.reset_prefix_cache()
    try:
        lp, counters = _force(llm, req, kv_params, salt, ids)
        rec.update(answer_logprobs=lp, forced_from=mode, forced_counters=counters)
    except Exception as e:  # noqa: BLE001 - recorded per request, the run goes on
        rec.update(answer_logprobs=None, forced_from=mode, forced_error=f"{type(e).__name__}: {e}")


def run_engine(spec: dict, out_path: Path) -> None:
    from vllm import LLM, SamplingParams

    kwargs = {}
    if spec["extra"] is not None:
        kwargs["kv_transfer_config"] = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": spec["extra"]}
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], enforce_eager=True, dtype=spec.get("dtype", "bfloat16"), seed=0,
              max_model_len=spec["max_model_len"], enable_prefix_caching=True, disable_log_stats=False,
              max_logprobs=LOGPROBS, logits_processors=["forced_answer:ForceAnswer"], **kwargs)
    result = {"engine_start_s": time.perf_counter() - t0, "phases": []}
    # One long request without separators so one-time lazy set-up is not charged to a timed request.
    llm.generate([spec["engine_warmup_prompt"]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    for ph in spec["phases"]:
        todo = spec["requests"] if ph["requests"] == "all" else ph["requests"]
        print(f"[{ph['name']}] {len(todo)} requests", flush=True)
        llm.reset_prefix_cache()  # no phase starts on what the one before left cached
        m_start, t_phase, reqs, cached = _metrics(llm), time.perf_counter(), [], []
        for req in todo:
            if ph["reset_each"]:
                llm.reset_prefix_cache()
            # salt_each: a fresh tenant per request, so no tier of kvplug holds any of its KV
            salt = f"{ph['name']}/{req['id']}" if ph.get("salt_each") else None
            rec, ids, lps = _generate(llm, req, ph["kv_params"], salt)
            if ph.get("forced") and req.get("answer"):
                _answer(llm, rec, req, ph["kv_params"], salt, ph["forced"], ids, lps)
            reqs.append(rec)
            if ph.get("repeat_cached"):
                again, ids, lps = _generate(llm, req, ph["kv_params"], salt)
                if ph.get("forced") and req.get("answer"):
                    _answer(llm, again, req, ph["kv_params"], salt, "reuse", ids, lps)
                cached.append(again)
            ll = rec.get("answer_logprobs")
            print(f"  [{ph['name']}] {req['id']}: ttft {rec['ttft_s']:.3f} s ({rec['prompt_tokens']} tok) "
                  f"-> {rec['text'][:40]!r}" + (f" gold loglik {sum(ll) / len(ll):.3f}" if ll else ""), flush=True)
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
