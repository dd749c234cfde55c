"""Where offload alone loses time against vLLM alone on the retrieval trace: one in-process
engine per run (VLLM_ENABLE_V1_MULTIPROCESSING=0: scheduler, kvplug's connector halves and the
model in one Python process), timed, then timed again under cProfile.

    python benchmarks/profile_offload.py [--requests 8] [--dtype float32] [--runs vllm,kvplug_cpu,...]
                                         [--rounds 2] [--json PATH]

A run is a configuration and its CPU reservation, `name[:reserved]` (vllm, kvplug_cpu; reserved
= VLLM_CPU_NUM_OF_RESERVED_CPU, default 1 as serve.py pins it; the child then gets the OpenMP
threads and core binding vLLM's multiprocess executor gives a `vllm serve` worker, which an
in-process engine does not set up: OMP_NUM_THREADS = the cores left, GOMP_CPU_AFFINITY = them;
`none` leaves all three unset). Each run is a fresh child process: the model loads, one short request, then the
retrieval trace's prompts in one `LLM.generate` (greedy, ignore_eos), timed (wall_s), then the
same prompts again under a fresh cache_salt with cProfile on (profiled_wall_s; cProfile slows
Python code, so its shares are of the profiled wall). Reported per run: wall, OpenMP threads
and vLLM's KV cache blocks, kvplug's counters (save_seconds, load_seconds, hit tokens), and
from the profile: seconds inside kvplug (own time of functions under kvplug/), the connector
entry points (cumulative), vLLM's model forward, the scheduler, and the top functions by own
time. Runs alternate over --rounds so drift on a shared machine hits every configuration.
Offline, LLM.get_metrics() hands counters over as integers (vllm/v1/metrics/reader.py): kvplug's
*_seconds counters arrive truncated to whole seconds, so the seconds come from the profile.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ENTRY_POINTS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                "start_load_kv", "wait_for_save", "save_kv_layer", "wait_for_layer_load", "get_finished",
                "request_finished", "update_connector_output", "get_kv_connector_stats", "build_connector_worker_meta")
VLLM_PARTS = {"model_forward": ("execute_model", "vllm/v1/worker"), "schedule": ("schedule", "vllm/v1/core/sched"),
              "update_from_output": ("update_from_output", "vllm/v1/core/sched")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--ret-docs", type=int, default=200)
    p.add_argument("--doc-min-tokens", type=int, default=256)
    p.add_argument("--doc-max-tokens", type=int, default=768)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPE_BYTES))
    p.add_argument("--vllm-kv-blocks", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=6144)
    p.add_argument("--runs", default="vllm,kvplug_cpu", help="name[:reserved], reserved an int or 'none'")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "profile_offload.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- child: one engine
def _trace(args, tok):
    from workloads import retrieval
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return retrieval.generate(n=args.requests, n_docs=args.ret_docs, doc_min_tokens=args.doc_min_tokens,
                              doc_max_tokens=args.doc_max_tokens, max_tokens=args.max_tokens, tokenizer=enc)


def _profile_summary(prof, wall: float) -> dict:
    import pstats
    st = pstats.Stats(prof).stats
    kv_self = sum(tt for (f, _, _), (_, _, tt, _, _) in st.items() if "/kvplug/" in f)
    entry = {fn: {"cum_s": ct, "calls": nc} for (f, _, fn), (_, nc, _, ct, _) in st.items()
             if f.endswith("kvplug/connector/connector.py") and fn in ENTRY_POINTS}
    parts = {}
    for part, (fn_name, where) in VLLM_PARTS.items():
        cands = [ct for (f, _, fn), (_, _, _, ct, _) in st.items() if fn == fn_name and where in f]
        parts[part] = max(cands) if cands else None
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[:25]
    kv_cum = sorted(((f, ln, fn, nc, ct) for (f, ln, fn), (_, nc, _, ct, _) in st.items() if "/kvplug/" in f),
                    key=lambda x: -x[4])[:20]
    connector = sum(e["cum_s"] for e in entry.values())
    return {"profiled_wall_s": wall, "kvplug_own_s": kv_self, "kvplug_own_share": kv_self / wall if wall else None,
            "connector_cum_s": connector, "connector_share": connector / wall if wall else None,
            "kvplug_cum_top": [{"function": f"{f.split('/kvplug/')[-1]}:{ln}:{fn}", "cum_s": ct, "calls": nc}
                               for f, ln, fn, nc, ct in kv_cum],
            "connector_entry_points": entry, "vllm_parts_cum_s": parts,
            "top_own_time": [{"function": f"{Path(f).name}:{ln}:{fn}", "own_s": tt, "cum_s": ct, "calls": nc}
                             for (f, ln, fn), (_, nc, tt, ct, _) in top]}


def child(args) -> dict:
    import cProfile

    import torch
    from offload import kv_bytes_per_token
    from vllm import LLM, SamplingParams

    name = args.child.split(":")[0]
    per_tok = kv_bytes_per_token(Path(args.model), DTYPE_BYTES[args.dtype])
    kw = {}
    if name == "kvplug_cpu":  # holds every prefix of the trace several times over
        kw["kv_transfer_config"] = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                    "kv_connector_extra_config": {"cpu_bytes": int(4e9)}}
    llm = LLM(model=args.model, enforce_eager=True, dtype=args.dtype, max_model_len=args.max_model_len,
              enable_prefix_caching=True, seed=0, kv_cache_memory_bytes=args.vllm_kv_blocks * 128 * per_tok,
              disable_log_stats=False, **kw)
    trace = _trace(args, llm.get_tokenizer())
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(["Hello, my name is"], SamplingParams(max_tokens=2), use_tqdm=False)

    def counters():
        return {m.name.removeprefix("vllm:kvplug_"): m.value for m in llm.get_metrics()
                if m.name.startswith("vllm:kvplug_") and hasattr(m, "value")}

    def prompts(salt):  # a fresh cache_salt: the second pass reuses nothing of the first
        return [{"prompt": r.prompt, "cache_salt": salt} for r in trace]
    c0, t0 = counters(), time.perf_counter()
    llm.generate(prompts("timed"), sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    c1 = counters()
    out = {"run": args.child, "wall_s": wall, "requests": len(trace), "omp_threads": torch.get_num_threads(),
           "vllm_kv_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
           "reserved_cpus": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
           "counters": {k: c1[k] - c0.get(k, 0) for k in c1}}
    if not args.no_profile:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        llm.generate(prompts("profiled"), sp, use_tqdm=False)
        prof.disable()
        out["profile"] = _profile_summary(prof, time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------- parent
def run_child(run: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE")}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    reserved = run.split(":")[1] if ":" in run else "1"
    if reserved == "none":
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    else:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
        # What vLLM's multiprocess executor gives a `vllm serve` worker (utils/ompmultiprocessing.py):
        # the cores left after the reservation, one OpenMP thread each, bound. In-process nobody does.
        cores = list(range(max(1, (os.cpu_count() or 1) - int(reserved))))
        env.update(OMP_NUM_THREADS=str(len(cores)), GOMP_CPU_AFFINITY=",".join(map(str, cores)))
    argv = [a for a in sys.argv[1:]] + ["--child", run, "--model", args.model]
    proc = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, timeout=7200)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        return {"run": run, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    from models import resolve_model
    args.model = resolve_model(args.model, args.data_dir)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs = [r for r in args.runs.split(",") if r]
    results = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for rnd in range(args.rounds):
        for run in runs:
            print(f"== round {rnd}: {run}", flush=True)
            res = run_child(run, args)
            print(f"   {res.get('wall_s', res.get('error', '')[-300:])}", flush=True)
            results.append({**res, "round": rnd, "loadavg_after": os.getloadavg()})
            report = {"benchmark": "profile_offload", "argv": sys.argv[1:], "dtype": args.dtype,
                      "requests": args.requests, "results": results}
            args.json.write_text(json.dumps(report, indent=1) + "\n")  # after each run: a long run keeps its part
    for r in results:
        p = r.get("profile", {})
        kv = r.get("counters", {})
        print(f"{r['run']:>16} round {r['round']}: wall {r.get('wall_s', float('nan')):.2f} s, omp {r.get('omp_threads')}, "
              f"kv blocks {r.get('vllm_kv_blocks')}, saved blocks {kv.get('saved_blocks', 0)}, "
              f"hit tokens {kv.get('cpu_hit_tokens', 0)}; profiled {p.get('profiled_wall_s', float('nan')):.2f} s, "
              f"in the connector's entry points {p.get('connector_cum_s', 0):.2f} s (wait_for_save "
              f"{p.get('connector_entry_points', {}).get('wait_for_save', {}).get('cum_s', 0):.2f} s)")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
