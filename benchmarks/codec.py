"""KV codecs of the cold tiers (disk_codec / remote_codec): bytes, speed, load time and quality.

    python benchmarks/codec.py [--quick] [--json PATH] [--model PATH] [--docs N] [--questions N]

1. Bytes: the encoder's exact bytes per token of the model's KV, and what the tiers hold after the
   same warm-up with each codec (disk files, Redis values).
2. Speed, in this process (torch backend, what the tiers run on a CPU): encode and decode GB/s of a
   4K-token unit against a copy of the same bytes (the ceiling), and per 128-token block (the CPU
   tier's unit: would a cpu_codec pay?). Load time of a 4K-token prompt (32 blocks laid out as the
   CPU backend's, 128 tokens each) from a DiskStore and a RemoteStore per codec, the codecs
   interleaved round by round so they share the machine's noise.
3. Engines (each in its own process, SmolLM2 in bf16, vLLM 0.32 CPU): vLLM alone (reference) and
   kvplug with cpu_bytes=0, a disk tier and a Redis tier, per codec none / int8 / int4. Documents
   and questions are the offload benchmark's (benchmarks/offload.py). Warm-up computes each document
   once (kvplug saves it to both tiers); then every (document, question) prompt is served with the
   document from disk (vLLM's prefix cache reset before each), then from Redis (disk files deleted).
   vLLM alone serves the same prompts from its own prefix cache: the same split (cached document
   blocks + computed question), so the `none` codec is the control (exact KV) and any difference of
   int8/int4 is the codec's.
   Quality per prompt against vLLM alone: KL(vLLM alone || codec) of the first answer token over the
   whole vocabulary, first-token agreement and agreement of the whole greedy continuation (Wilson
   95% intervals); TTFT of tier hits per 4K-token prompt and over all prompts.
Headline: int8_bytes_ratio, int8_agreement, int8_kl, int4_bytes_ratio, int4_agreement, int4_kl,
disk_hit_ttft_ratio_int8 (bytes: disk bytes over the `none` codec's; agreement: whole greedy
continuations equal to vLLM alone's; kl: mean first-token KL in nats; ratio: median TTFT of 4K-token
disk hits with int8 over without a codec).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import codec_engine  # noqa: E402
import serving  # noqa: E402
from blend_metrics import paired_bootstrap_ci, wilson_ci  # noqa: E402
from offload import LONG_DOC, build_documents, doc_lengths, question_ids  # noqa: E402

from kvplug.tiers.codec import PermutedView, TokensView, UnitCodec, make_codec  # noqa: E402

RESULTS = HERE / "results"
BLOCK = 128
CODECS = ("none", "int8", "int4")


# ---------------------------------------------------------------- in-process: bytes and speed
def model_shape(model_dir: str) -> tuple[int, int, int]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"], cfg["num_key_value_heads"], head


def _median_s(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def codec_speed(L: int, KV: int, D: int, tokens: int) -> dict:
    g = torch.Generator().manual_seed(tokens)
    kv = (torch.randn(L, 2, tokens, KV, D, generator=g) * 2).to(torch.bfloat16)
    payload = kv.reshape(-1).view(torch.uint8)
    raw = payload.numel()
    out = {"tokens": tokens, "raw_bytes": raw, "copy_s": _median_s(lambda: payload.clone())}
    out["copy_GBps"] = 2 * raw / out["copy_s"] / 1e9  # read + write, as benchmarks/kernels.py counts the ceiling
    for name in CODECS[1:]:
        codec = UnitCodec(make_codec(name), {"x": TokensView(L, KV, D, torch.bfloat16)})
        enc = codec.encode(payload, "x")
        enc_s, dec_s = _median_s(lambda: codec.encode(payload, "x")), _median_s(lambda: codec.decode(enc, "x"))
        moved = raw + enc.numel()
        out[name] = {"encoded_bytes": enc.numel(), "bytes_per_token": enc.numel() / tokens,
                     "encode_s": enc_s, "decode_s": dec_s,
                     "encode_GBps": raw / enc_s / 1e9, "decode_GBps": raw / dec_s / 1e9,
                     "encode_pct_copy": 100 * moved / enc_s / 1e9 / out["copy_GBps"],
                     "decode_pct_copy": 100 * moved / dec_s / 1e9 / out["copy_GBps"]}
    return out


def bytes_per_token(L: int, KV: int, D: int) -> dict:
    raw = 2 * L * KV * D * 2
    out = {"none": raw}
    for name in CODECS[1:]:
        out[name] = make_codec(name).encoded_nbytes(L, BLOCK, KV, D) / BLOCK
    return out


def cpu_block_view(L: int, KV: int, D: int) -> PermutedView:
    """vLLM's CPU block [KV, 128, 2D] (K then V of a token and head): the opaque path's element order."""
    idx = torch.arange(KV * BLOCK * 2 * D).view(KV, BLOCK, 2 * D)
    k = idx[..., :D].permute(1, 0, 2).reshape(BLOCK, KV * D)
    v = idx[..., D:].permute(1, 0, 2).reshape(BLOCK, KV * D)
    return PermutedView(L, KV, D, torch.bfloat16, BLOCK, k, v)


def tier_load_times(L: int, KV: int, D: int, work: Path, redis_url: str, rounds: int) -> dict:
    from kvplug.tiers.disk import DiskStore
    from kvplug.tiers.remote import RemoteStore

    g = torch.Generator().manual_seed(7)
    blocks = [(torch.randn(L, 2 * BLOCK * KV * D, generator=g) * 2).to(torch.bfloat16).view(torch.uint8).flatten()
              for _ in range(LONG_DOC // BLOCK)]
    keys = [i.to_bytes(32, "little") for i in range(len(blocks))]
    views, stores = {"cpu-block": cpu_block_view(L, KV, D)}, {}
    for name in CODECS:
        codec = None if name == "none" else UnitCodec(make_codec(name), views)
        stores[name] = (DiskStore(work / f"load_{name}", "cpu-block", codec=codec),
                        RemoteStore(redis_url, "cpu-block", namespace=f"load-{name}", timeout_s=5.0, codec=codec))
        for store in stores[name]:
            for k, b in zip(keys, blocks):
                store.put(k, b)
            store.flush()
    times = {f"{n}_{t}": [] for n in CODECS for t in ("disk", "remote")}
    for _ in range(rounds):
        for name, (disk, remote) in stores.items():
            for tier, store in (("disk", disk), ("remote", remote)):
                t = time.perf_counter()
                got = store.get_many(keys)
                times[f"{name}_{tier}"].append(time.perf_counter() - t)
                assert all(x is not None for x in got), f"{name} {tier}: a unit did not load"
    for disk, remote in stores.values():
        disk.close()
        remote.close()
    out = {k: {"p50_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)} for k, v in times.items()}
    for name in CODECS[1:]:
        for tier in ("disk", "remote"):
            out[f"{name}_{tier}_ratio"] = out[f"{name}_{tier}"]["p50_s"] / out[f"none_{tier}"]["p50_s"]
    return out


# ---------------------------------------------------------------- engines
def prompts(tok, docs: list[list[int]], questions: int) -> list[dict]:
    return [{"doc": d, "round": r, "ids": doc + question_ids(tok, d, r)}
            for r in range(1, questions + 1) for d, doc in enumerate(docs)]


def engine_specs(args, docs, plist, work: Path, redis_url: str) -> dict:
    warm = [doc + question_ids(args.tok, d, 0) for d, doc in enumerate(docs)]
    base = {"model": args.model, "warm": warm, "prompts": plist, "greedy_tokens": args.greedy_tokens,
            "expect_units": sum(len(w) // BLOCK for w in warm)}
    specs = {"vllm": {**base, "extra": None, "phases": ["ref"]}}
    for name in CODECS:
        disk = work / f"disk_{name}"
        specs[name] = {**base, "phases": ["disk", "remote"], "disk_path": str(disk), "redis_url": redis_url,
                       "extra": {"cpu_bytes": 0, "disk_path": str(disk), "disk_bytes": int(2e10), "disk_codec": name,
                                 "remote_url": redis_url, "remote_codec": name, "remote_namespace": f"bench-{name}",
                                 "remote_timeout_ms": args.remote_timeout_ms}}
    return specs


def run_engines(args, specs: dict, work: Path, redis_url: str) -> dict:
    import redis

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A step of a 4K-token prefill took over vLLM's 300 s RPC limit on this machine under load.
    env = serving.same_cpu_threads_env({**env, "VLLM_CPU_KVCACHE_SPACE": "2",
                                        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"}, 1)
    out = {}
    for name, spec in specs.items():
        redis.Redis.from_url(redis_url).flushall()  # each engine's Redis bytes are its own
        shutil.rmtree(spec.get("disk_path") or work / "none", ignore_errors=True)
        out[name] = codec_engine.spawn(name, spec, work, env, args.engine_timeout_s)
    return out


# ---------------------------------------------------------------- analysis
def kl_first_token(ref: np.ndarray, got: np.ndarray) -> list[float]:
    """KL(ref || got) per prompt, nats, over the whole vocabulary (float64)."""
    r, g = ref.astype(np.float64), got.astype(np.float64)
    p = np.exp(r)
    return [float(x) for x in np.where(p > 0, p * (r - g), 0.0).sum(axis=1)]


def ttft_summary(reqs: list[dict], doc_tokens: list[int], only_long: bool) -> dict:
    ts = [r["ttft_s"] for r in reqs if not only_long or doc_tokens[r["doc"]] == LONG_DOC]
    if not ts:
        return {"n": 0}
    return {"n": len(ts), "p50_s": serving.percentile(ts, 50), "p25_s": serving.percentile(ts, 25),
            "p75_s": serving.percentile(ts, 75), "mean_s": statistics.fmean(ts)}


def quality(ref: dict, run: dict) -> dict:
    kl = kl_first_token(ref["logprobs"], run["logprobs"])
    rr, gr = ref["phases"][0]["requests"], run["phases"][0]["requests"]
    first = [int(a["greedy"][0] == b["greedy"][0]) for a, b in zip(rr, gr)]
    whole = [int(a["greedy"] == b["greedy"]) for a, b in zip(rr, gr)]
    lo, hi = paired_bootstrap_ci(kl, [0.0] * len(kl))
    return {"n": len(kl), "kl_mean": statistics.fmean(kl), "kl_ci95": [lo, hi], "kl_max": max(kl),
            "kl_median": statistics.median(kl),
            "first_token_agreement": sum(first) / len(first), "first_token_ci95": wilson_ci(sum(first), len(first)),
            "greedy_agreement": sum(whole) / len(whole), "greedy_ci95": wilson_ci(sum(whole), len(whole)),
            "greedy_mismatches": [{"doc": a["doc"], "round": a["round"], "ref": a["greedy"], "got": b["greedy"]}
                                  for a, b in zip(rr, gr) if a["greedy"] != b["greedy"]]}


def summarize(runs: dict, doc_tokens: list[int]) -> dict:
    out = {}
    base = runs["none"].get("tier_bytes", {})
    for name in CODECS:
        run = runs[name]
        if "error" in run:
            out[name] = {"error": run["error"]}
            continue
        tb = run.get("tier_bytes", {})
        phases = {p["name"]: p for p in run["phases"]}
        out[name] = {
            "tier_bytes": tb,
            "disk_bytes_ratio": tb.get("disk_bytes", math.nan) / base.get("disk_bytes", math.nan),
            "remote_bytes_ratio": tb.get("remote_bytes", math.nan) / base.get("remote_bytes", math.nan),
            "ttft_4k": {ph: ttft_summary(p["requests"], doc_tokens, True) for ph, p in phases.items()},
            "ttft_all": {ph: ttft_summary(p["requests"], doc_tokens, False) for ph, p in phases.items()},
            "counters": {ph: p["counters"] for ph, p in phases.items()},
            "warm": run.get("warm"), "engine_start_s": run.get("engine_start_s"),
            "quality_vs_vllm": quality(runs["vllm"], run) if "error" not in runs["vllm"] else None,
        }
    return out


def ratio(cfgs: dict, name: str, phase: str) -> float:
    try:
        return cfgs[name]["ttft_4k"][phase]["p50_s"] / cfgs["none"]["ttft_4k"][phase]["p50_s"]
    except (KeyError, TypeError, ZeroDivisionError):
        return math.nan


def headline(cfgs: dict, loads: dict) -> dict:
    h = {}
    for name in CODECS[1:]:
        q = (cfgs.get(name) or {}).get("quality_vs_vllm") or {}
        h[f"{name}_bytes_ratio"] = cfgs.get(name, {}).get("disk_bytes_ratio", math.nan)
        h[f"{name}_agreement"] = q.get("greedy_agreement", math.nan)
        h[f"{name}_kl"] = q.get("kl_mean", math.nan)
    h["disk_hit_ttft_ratio_int8"] = ratio(cfgs, "int8", "disk")
    h["remote_hit_ttft_ratio_int8"] = ratio(cfgs, "int8", "remote")
    h["disk_hit_ttft_ratio_int4"] = ratio(cfgs, "int4", "disk")
    h["remote_hit_ttft_ratio_int4"] = ratio(cfgs, "int4", "remote")
    for name in CODECS[1:]:  # the same loads in one process, interleaved: the codec's own cost, less noisy
        for tier in ("disk", "remote"):
            h[f"{tier}_load_4k_ratio_{name}"] = loads[f"{name}_{tier}_ratio"]
    return h


def print_report(rep: dict) -> None:
    sp = rep["speed"]
    print(f"\ncopy ceiling {sp['4k']['copy_GBps']:.1f} GB/s (read + write), torch threads {rep['torch_threads']}")
    for size in ("4k", "block"):
        for name in CODECS[1:]:
            s = sp[size][name]
            print(f"  {size:>5} {name}: {s['bytes_per_token']:.0f} B/token, encode {s['encode_GBps']:.2f} GB/s "
                  f"({s['encode_s'] * 1e3:.1f} ms), decode {s['decode_GBps']:.2f} GB/s ({s['decode_s'] * 1e3:.1f} ms)")
    ld = rep["load_4k_prompt"]
    print("\nload of a 4K-token prompt (32 blocks), in process, p50 s:",
          {k: round(v["p50_s"], 3) for k, v in ld.items() if isinstance(v, dict)})
    rows = []
    for name, c in rep["configs"].items():
        if "error" in c:
            print(f"{name}: ERROR {c['error']}")
            continue
        q = c["quality_vs_vllm"] or {}
        rows.append({"codec": name, "disk_ratio": c["disk_bytes_ratio"], "redis_ratio": c["remote_bytes_ratio"],
                     "disk_4k_p50": c["ttft_4k"]["disk"].get("p50_s"), "redis_4k_p50": c["ttft_4k"]["remote"].get("p50_s"),
                     "kl_mean": q.get("kl_mean"), "first_tok_agree": q.get("first_token_agreement"),
                     "greedy_agree": q.get("greedy_agreement")})
    print()
    serving.print_table(rows, list(rows[0]) if rows else [])
    print("\nheadline:", json.dumps(rep["headline"]))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 documents, 2 questions each")
    p.add_argument("--json", type=Path)
    p.add_argument("--model")
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--docs", type=int)
    p.add_argument("--questions", type=int)
    p.add_argument("--greedy-tokens", type=int, default=8)
    p.add_argument("--remote-timeout-ms", type=float, default=1000.0,
                   help="remote_timeout_ms of the engines: a 4K-token prompt's units are ~90 MB on the wire")
    p.add_argument("--engine-timeout-s", type=float, default=1800.0)
    p.add_argument("--load-rounds", type=int, default=7, help="interleaved rounds of the in-process tier loads")
    a = p.parse_args(argv)
    a.docs = a.docs or (2 if a.quick else 6)
    a.questions = a.questions or (2 if a.quick else 6)
    a.json = a.json or RESULTS / ("codec_quick.json" if a.quick else "codec.json")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all, load_start = time.monotonic(), os.getloadavg()
    from models import resolve_model
    from transformers import AutoTokenizer

    args.model = resolve_model(args.model, args.data_dir)
    args.tok = AutoTokenizer.from_pretrained(args.model)
    lengths = doc_lengths(args.docs)
    docs, source = build_documents(args.tok, lengths)
    L, KV, D = model_shape(args.model)
    speed = {"4k": codec_speed(L, KV, D, LONG_DOC), "block": codec_speed(L, KV, D, BLOCK)}
    plist = prompts(args.tok, docs, args.questions)
    work = Path(args.data_dir).resolve() / "bench" / "codec"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with serving.redis_server(work / "redis") as url:
        loads = tier_load_times(L, KV, D, work, url, args.load_rounds)
        runs = run_engines(args, engine_specs(args, docs, plist, work, url), work, url)
    cfgs = summarize(runs, lengths)
    rep = {"benchmark": "codec", "quick": args.quick,
           "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": serving.machine_info(), "model": args.model, "torch_threads": torch.get_num_threads(),
           "documents": {"n": len(docs), "source": source, "token_lengths": lengths, "questions_per_doc": args.questions,
                         "prompts": len(plist)},
           "bytes_per_token": bytes_per_token(L, KV, D), "speed": speed, "load_4k_prompt": loads, "configs": cfgs,
           "vllm_alone": {k: runs["vllm"].get(k) for k in ("engine_start_s", "warm", "error")},
           "headline": headline(cfgs, loads), "wall_s": time.monotonic() - t_all,
           "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
           "notes": ["disk hits include the OS page cache (not dropped)",
                     f"remote_timeout_ms={args.remote_timeout_ms:g} in the engines",
                     "the machine is shared (2 cores, other jobs running): timings are noisy, compare within a run"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rep, indent=1, default=float) + "\n")
    print_report(rep)
    print(f"wrote {args.json} (wall {rep['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
