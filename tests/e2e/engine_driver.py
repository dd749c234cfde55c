"""Runs one vLLM engine (offline `LLM`) in its own process for the end-to-end tests.

    python engine_driver.py SPEC.json OUT.json

SPEC: {"model": path, "extra": kv_connector_extra_config or null (no connector),
       "steps": [{"prompts": [str | {"prompt": str, "cache_salt": str} | {"prompt_token_ids": [int]}],
                  "kv_transfer_params": [dict per prompt] (optional), "reset_prefix_cache": bool}],
       "max_tokens": n,
       "enable_prefix_caching": bool,
       "tensor_parallel_size": n (default 1; the CPU backend runs the ranks as processes)}
OUT:  {"steps": [{"texts": [...], "logprobs": [[{token: logprob}...]...], "counters": {name: delta}}]}
A separate process per engine: vLLM's engine core uses spawn, and each test needs a fresh engine.
"""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def kvplug_counters(llm) -> dict[str, float]:
    # Counters and gauges only: the blend audits are a histogram (no .value), present once one was sampled.
    return {m.name.removeprefix("vllm:kvplug_"): m.value for m in llm.get_metrics()
            if m.name.startswith("vllm:kvplug_") and hasattr(m, "value")}


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = {}
    if spec.get("extra") is not None:
        kwargs["kv_transfer_config"] = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": spec["extra"]}
    tp = spec.get("tensor_parallel_size", 1)
    if tp > 1:
        kwargs.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
        # vLLM's CPU workers bind their threads per NUMA node unless told which cores: one each here.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r % os.cpu_count()) for r in range(tp)))
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=2048, dtype="float32", seed=0,
              enable_prefix_caching=spec.get("enable_prefix_caching", True), disable_log_stats=False, **kwargs)
    sp = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 12), logprobs=3)
    out = []
    before = kvplug_counters(llm)
    for step in spec["steps"]:
        if step.get("reset_prefix_cache"):
            llm.reset_prefix_cache()
        params = step.get("kv_transfer_params")
        sps = sp if params is None else [
            SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 12), logprobs=3,
                           extra_args={"kv_transfer_params": p}) for p in params]
        results = llm.generate(step["prompts"], sps, use_tqdm=False)
        after = kvplug_counters(llm)
        out.append({
            "texts": [r.outputs[0].text for r in results],
            "token_ids": [list(r.outputs[0].token_ids) for r in results],
            "logprobs": [[{str(t): lp.logprob for t, lp in pos.items()} for pos in r.outputs[0].logprobs]
                         for r in results],
            "counters": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        })
        before = after
    return {"steps": out}


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    result = run(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
