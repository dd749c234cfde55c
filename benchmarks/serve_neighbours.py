"""The "neighbours" case of benchmarks/serve.py: do slow requests hold up the CPU-tier hits
sharing the engine with them?

Before issue 10's restructure (commit ca00f90) kvplug loaded KV that it found on disk or in
Redis before the step's forward pass, and when a blended request had a first-seen document,
kvplug prefilled that document in its own per-request loop at the same point. Every other
request in the step waited. Now disk/Redis loads run in the background (`async_loads`, vLLM's
async-load path) and vLLM computes first-seen documents in its own batch. This case measures
what the change gives the requests that need nothing slow.

"Before" and "after" run side by side in one benchmark run, one fresh `vllm serve` each
(``--neighbours``; group "neighbours"):
  nb_before  kvplug as committed at BEFORE_REV (2370964, the last commit before the
             restructure; ``--before-rev``). It comes from a ``git archive`` of that revision
             placed first on the server's PYTHONPATH and uses that revision's keys
             (blend_cpu_bytes, blend_disk_bytes). Its disk/Redis loads are synchronous and it
             prefills first-seen chunks in its own loop: the previous behaviour in both respects.
  nb_sync    this tree with ``async_loads: false``, the config switch kept for the comparison.
             Its loads are synchronous and vLLM computes first-seen documents in its batch, so
             nb_sync against nb_after isolates the asynchronous loads (full mode only).
  nb_after   this tree with its defaults.
The JSON records which kvplug each server imported (``kvplug_imported_from``).
Every server has a CPU tier, a disk tier and the run's loopback redis-server, blends (nb_before:
fixed, 0.15; this tree's servers: kvplug's default blend settings), and gives two tenants
(cache_salt) quotas that keep their units where this case needs them:
  nb-disk    {"cpu_bytes": 0}: never in the CPU tier, so every load of its units comes from disk;
  nb-remote  {"cpu_bytes": 0, "disk_bytes": 0}: only in Redis.

Contexts: --nb-docs documents of --doc-tokens tokens each, joined by the separator. No document
appears in two contexts. There are --nb-hit-contexts hit contexts, one load context per load
neighbour, one first-seen context per first-seen neighbour and one blend context per blended
neighbour (BLEND_LEAD, then its documents: every document follows a separator, so its chunk is
the same in any order). Each server, in order:
  warm-up    (untimed, 1 output token) every load context under its tenant, every blend context
             (its chunks are saved), then every hit context. The load contexts land on disk or in
             Redis, the hit contexts and the blend contexts' chunks in the CPU tier; vLLM's own
             cache (--vllm-kv-blocks, a few requests) ends up holding only recent hits.
  alone      --nb-hits hit requests (a hit context plus a new question; `"blend": false`, so a hit
             is a pure prefix hit with no blending work), cycling through the hit contexts, whose
             LRU order defeats vLLM's own prefix cache.
  loads      as many hit requests, with --nb-loads load neighbours spread evenly among them
             (alternately disk and Redis; each load context once, with a new question).
  first_seen as many hit requests, with --nb-new first-seen neighbours: contexts of documents
             nobody has sent, blended (the old code prefills them in its own loop).
  blends     as many hit requests, with --nb-blends blended neighbours: each blend context with
             its documents in reverse order and a new question, so every chunk is cached but no
             prefix beyond BLEND_LEAD is: the neighbours blend and nothing else (issue 17:
             neighbours_hit_p50_ratio = the hits' p50 here / alone, on nb_after).
Per server and phase the report gives the hits' TTFT p50/p90, the neighbours' TTFT, the phase's
requests/s and kvplug's counters over the phase (cpu/disk/remote hit tokens show where the KV
came from; vllm_prefix_hit_rate shows how much vLLM's own cache served). Side by side it gives
the hits' p50/p90 per phase and server, each server's ratio with neighbours / alone, and
after / before.

    add_args(parser) / finish_args(args)     --neighbours, --nb-* and --before-rev (quick/full defaults)
    NB_CONFIGS, selected(args)               the registry and the configurations a run asks for
    spread(hits, neighbours)                 neighbours placed evenly among the hits, order kept
    reordered(context)                       a blend context's documents in a new order
    build_phases(sizes, documents, max_tokens, seed) -> {phase: [NbRequest]}   warm-up and the four phases
    phase_stats(reqs, results, wall_s, counters)   one phase's figures (hits and neighbours apart)
    run_case(cfgs, run) -> dict              every server in turn; the report's "neighbours" section
    print_section(section)                   the per-phase table and the side-by-side table
"""
from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402
from serve_clients import aggregate, kvplug_origin, run_trace, scrape, scrape_delta, warm_pass  # noqa: E402
from workloads import SEPARATOR, Request  # noqa: E402
from workloads.text import question  # noqa: E402

BEFORE_REV = "2370964"  # the last commit before the restructure (ca00f90)
PHASES = ("alone", "loads", "first_seen", "blends")
BLEND_LEAD = "Read the documents below, then answer the question."  # shorter than a cached chunk
NB_QUICK = ("nb_before", "nb_after")
NB_FULL = ("nb_before", "nb_sync", "nb_after")
# Per request: hits opt out of blending so that they are pure prefix hits; load neighbours sit
# in the tenants whose quotas keep their units out of the CPU tier (and, for Redis, off disk).
BODIES = {"hit": {"kv_transfer_params": {"blend": False}},
          "disk": {"cache_salt": "nb-disk", "kv_transfer_params": {"blend": False}},
          "remote": {"cache_salt": "nb-remote", "kv_transfer_params": {"blend": False}},
          "new": {}, "blend": {}}
QUOTAS = {"nb-disk": {"cpu_bytes": 0}, "nb-remote": {"cpu_bytes": 0, "disk_bytes": 0}}


# ---------------------------------------------------------------- sizes and arguments
@dataclass(frozen=True)
class NbSizes:
    hit_contexts: int
    hits: int  # hit requests per phase
    loads: int  # load neighbours (disk and Redis alternately) in the loads phase
    new: int  # first-seen neighbours in the first_seen phase
    docs: int  # documents per context
    blends: int = 0  # blended neighbours (all chunks cached, new order) in the blends phase


QUICK = NbSizes(hit_contexts=3, hits=8, loads=4, new=2, docs=6, blends=2)
FULL = NbSizes(hit_contexts=4, hits=16, loads=8, new=4, docs=6, blends=4)


def add_args(p) -> None:
    p.add_argument("--neighbours", default=None,
                   help=f"neighbours-case servers, '' = skip (quick {','.join(NB_QUICK)}; else {','.join(NB_FULL)})")
    p.add_argument("--before-rev", default=BEFORE_REV, help="kvplug revision nb_before runs (git archive)")
    for name, what in (("hit-contexts", "hit contexts"), ("hits", "hit requests per phase"),
                       ("loads", "load neighbours (disk/Redis alternately)"), ("new", "first-seen neighbours"),
                       ("docs", "documents per context"), ("blends", "blended neighbours (cached chunks, new order)")):
        p.add_argument(f"--nb-{name}", type=int, default=None,
                       help=f"neighbours case: {what} (quick {getattr(QUICK, name.replace('-', '_'))}, "
                            f"else {getattr(FULL, name.replace('-', '_'))})")


def finish_args(a) -> None:
    base = QUICK if a.quick else FULL
    a.nb_sizes = NbSizes(**{f: getattr(a, f"nb_{f}") if getattr(a, f"nb_{f}") is not None else getattr(base, f)
                            for f in NbSizes.__dataclass_fields__})
    if a.neighbours is None:
        a.neighbours = ",".join(NB_QUICK if a.quick else NB_FULL)


# ---------------------------------------------------------------- configurations
@dataclass(frozen=True)
class NbPlan:
    working_set_bytes: int  # KV of every context of the case
    work_dir: str
    remote_url: str | None


@dataclass(frozen=True)
class NbConfig:
    name: str
    role: str  # "before" or "after"
    extra: Callable[[NbPlan], dict]
    description: str
    rev: str | None = None  # None: the working tree; "before": the --before-rev revision


def _mb(x: float) -> int:
    return int(x) + (16 << 20)  # slack for partial blocks and rounding


def _common(p: NbPlan) -> dict:
    # A fresh Redis namespace per server start: every server begins with an empty store.
    return {"disk_path": f"{p.work_dir}/disk", "remote_url": p.remote_url,
            "remote_namespace": f"nb-{time.monotonic_ns()}", "remote_timeout_ms": 200, "blend": True,
            "namespaces": QUOTAS}


def _before(p: NbPlan) -> dict:
    # BEFORE_REV's keys: chunk KV had its own store and budgets beside the tiers (and its
    # measurements ran the fixed policy at 0.15).
    ws = p.working_set_bytes
    return {**_common(p), "cpu_bytes": _mb(1.5 * ws), "blend_cpu_bytes": _mb(1.5 * ws),
            "disk_bytes": _mb(4 * ws), "blend_disk_bytes": _mb(4 * ws), "recompute_ratio": 0.15,
            "recompute_policy": "fixed"}


def _now(async_loads: bool) -> Callable[[NbPlan], dict]:
    def extra(p: NbPlan) -> dict:  # one budget for blocks and chunks: the two budgets above together
        ws = p.working_set_bytes
        return {**_common(p), "cpu_bytes": _mb(3 * ws), "disk_bytes": _mb(8 * ws), "async_loads": async_loads}
    return extra


NB_CONFIGS = {c.name: c for c in (
    NbConfig("nb_before", "before", _before, "kvplug at --before-rev: synchronous disk/Redis loads, "
             "first-seen chunks prefilled in kvplug's own loop", rev="before"),
    NbConfig("nb_sync", "before", _now(False), "this tree, async_loads false: synchronous disk/Redis loads, "
             "first-seen documents in vLLM's batch"),
    NbConfig("nb_after", "after", _now(True), "this tree, defaults: asynchronous disk/Redis loads, "
             "first-seen documents in vLLM's batch"),
)}


def selected(args) -> list[NbConfig]:
    names = [n for n in args.neighbours.split(",") if n]
    unknown = [n for n in names if n not in NB_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown neighbours configurations {unknown}; registered: {', '.join(NB_CONFIGS)}")
    return [NB_CONFIGS[n] for n in names]


# ---------------------------------------------------------------- requests
@dataclass(frozen=True)
class NbRequest:
    kind: str  # hit, disk, remote, new
    context: int  # index into the case's contexts
    request: Request
    body: dict = field(default_factory=dict)


def spread(hits: list, neighbours: list) -> list:
    """All of both, each list's order kept, neighbour j at position ~(j + 0.5) * n / m: evenly
    among the hits, none at the very start or end when there are hits on both sides."""
    n, m = len(hits) + len(neighbours), len(neighbours)
    at = {(2 * j + 1) * n // (2 * m): j for j in range(m)}
    h = iter(hits)
    return [neighbours[at[i]] if i in at else next(h) for i in range(n)]


def contexts(sizes: NbSizes, documents: list[str]) -> dict[str, list[str]]:
    """Hit, load, first-seen and blend contexts, each of sizes.docs documents of its own (a blend
    context after BLEND_LEAD)."""
    counts = {"hit": sizes.hit_contexts, "load": sizes.loads, "new": sizes.new, "blend": sizes.blends}
    need = sum(counts.values()) * sizes.docs
    if len(documents) < need:
        raise ValueError(f"{need} documents needed, {len(documents)} given")
    out, d = {}, 0
    for kind, n in counts.items():
        lead = [BLEND_LEAD] if kind == "blend" else []
        out[kind] = [SEPARATOR.join(lead + documents[d + i * sizes.docs:d + (i + 1) * sizes.docs]) for i in range(n)]
        d += n * sizes.docs
    return out


def reordered(context: str) -> str:
    """A blend context with its documents in reverse order (BLEND_LEAD stays first)."""
    lead, *docs = context.split(SEPARATOR)
    return SEPARATOR.join([lead, *reversed(docs)])


def build_phases(sizes: NbSizes, documents: list[str], max_tokens: int, seed: int) -> dict[str, list[NbRequest]]:
    """The warm-up and the phases (module docstring). Every prompt is distinct: question
    numbers run over the whole case."""
    ctx = contexts(sizes, documents)
    rng, counter = random.Random(f"neighbours-{seed}"), iter(range(1, 1 << 30))
    load_kind = lambda i: "disk" if i % 2 == 0 else "remote"  # noqa: E731

    def req(kind: str, c: int, text: str, n_out: int = max_tokens, q: int | None = None) -> NbRequest:
        q = next(counter) if q is None else q
        prompt = f"{text}{SEPARATOR}Question {q}: {question(rng)}"
        return NbRequest(kind, c, Request(prompt=prompt, session=f"{kind}-{c}", round=q, doc_ids=(),
                                          max_tokens=n_out), BODIES[kind])

    hits = lambda: [req("hit", i % sizes.hit_contexts, ctx["hit"][i % sizes.hit_contexts])  # noqa: E731
                    for i in range(sizes.hits)]
    warm = [req(load_kind(i), i, t, 1, 0) for i, t in enumerate(ctx["load"])]
    warm += [req("blend", i, t, 1, 0) for i, t in enumerate(ctx["blend"])]
    warm += [req("hit", i, t, 1, 0) for i, t in enumerate(ctx["hit"])]
    return {"warm": warm, "alone": hits(),
            "loads": spread(hits(), [req(load_kind(i), i, t) for i, t in enumerate(ctx["load"])]),
            "first_seen": spread(hits(), [req("new", i, t) for i, t in enumerate(ctx["new"])]),
            "blends": spread(hits(), [req("blend", i, reordered(t)) for i, t in enumerate(ctx["blend"])])}


# ---------------------------------------------------------------- one phase
def phase_stats(reqs: list[NbRequest], results: list, wall_s: float, counters: dict) -> dict:
    """Hits and neighbours apart (their TTFTs), the phase's throughput and counters."""
    hit = [r for q, r in zip(reqs, results, strict=True) if q.kind == "hit"]
    nbs = [r for q, r in zip(reqs, results, strict=True) if q.kind != "hit"]
    h, n, kv = aggregate(hit, wall_s), aggregate(nbs, wall_s), counters.get("kvplug", {})
    prefix = counters.get("prefix_cache", {})
    kinds: dict[str, int] = {}
    for q in reqs:
        kinds[q.kind] = kinds.get(q.kind, 0) + 1
    return {"requests": len(results), "kinds": kinds, "wall_s": wall_s,
            "errors": h["errors"] + n["errors"],
            "requests_per_s": (len(results) - h["errors"] - n["errors"]) / wall_s if wall_s > 0 else float("nan"),
            "hits": len(hit), "hit_ttft_p50_s": h["ttft_p50_s"], "hit_ttft_p90_s": h["ttft_p90_s"],
            "hit_ttft_mean_s": h["ttft_mean_s"], "neighbours": len(nbs), "neighbour_ttft_p50_s": n["ttft_p50_s"],
            "neighbour_ttft_p90_s": n["ttft_p90_s"],
            **{k: int(kv.get(k, 0)) for k in ("lookup_tokens", "cpu_hit_tokens", "disk_hit_tokens", "remote_hit_tokens",
                                              "blend_requests", "blend_chunk_hits", "blend_chunk_misses",
                                              "load_errors")},
            "vllm_prefix_hit_rate": serving.ratio(prefix.get("hits", 0.0), prefix.get("queries", 0.0)),
            "counters": counters,
            "per_request": [{"kind": q.kind, "context": q.context, "start_s": r.start_s, "ttft_s": r.ttft_s,
                             "total_s": r.total_s, "prompt_tokens": r.prompt_tokens, "error": r.error}
                            for q, r in zip(reqs, results, strict=True)]}


def prepare(args, tok) -> tuple[dict, dict]:
    """(phases, workload info) of the case, sized in the model's tokens."""
    from workloads.text import load_corpus, make_documents

    sizes = args.nb_sizes
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    n_docs = (sizes.hit_contexts + sizes.loads + sizes.new + sizes.blends) * sizes.docs
    phases = build_phases(sizes, make_documents(n_docs, args.doc_tokens, args.seed, encode, load_corpus()),
                          args.max_tokens, args.seed)
    ctx = {f"{q.kind}-{q.context}": q.request.prompt.rsplit(SEPARATOR, 1)[0] for ph in phases.values() for q in ph}
    tokens = {k: len(encode(v)) for k, v in sorted(ctx.items())}
    info = {"name": "neighbours", "sizes": dataclasses.asdict(sizes),
            "documents": n_docs, "doc_tokens": args.doc_tokens, "context_tokens": tokens,
            "working_set_tokens": sum(tokens.values()), "max_tokens": args.max_tokens,
            "concurrency": args.concurrency, "seed": args.seed,
            "requests_per_phase": {ph: len(reqs) for ph, reqs in phases.items()}}
    return phases, info


# ---------------------------------------------------------------- servers
@dataclass
class NbRun:
    """What every server of the case shares."""
    model: str
    env: dict  # the working tree's server environment
    source: dict  # where the working tree's kvplug comes from (the report's "kvplug")
    serve_args: list[str]
    work: Path
    remote_url: str
    working_set_bytes: int
    concurrency: int
    before_rev: str = BEFORE_REV


def _env_for(cfg: NbConfig, run: NbRun) -> tuple[dict, dict]:
    if cfg.rev is None:
        return run.env, run.source
    from offload import kvplug_source  # git archive of the revision, first on PYTHONPATH

    return kvplug_source(run.before_rev, run.work, run.env)


def run_server(cfg: NbConfig, run: NbRun, phases: dict[str, list[NbRequest]]) -> dict:
    """One fresh server: warm-up, then each phase with its counters."""
    shutil.rmtree(run.work / "disk", ignore_errors=True)
    extra = cfg.extra(NbPlan(run.working_set_bytes, str(run.work), run.remote_url))
    env, source = _env_for(cfg, run)
    origin, log = kvplug_origin(env, run.work), run.work / f"{cfg.name}.log"
    print(f"== {cfg.name}: {cfg.description}; kvplug from {origin}; extra_config={extra} (log {log})", flush=True)
    t0 = time.monotonic()
    with serving.start_server(run.model, extra, env, None, log, run.serve_args, cwd=run.work) as url:
        start_s = time.monotonic() - t0
        serving.stream_request(url, run.model, "Hello, my name is", 2)  # one-time set-up, untimed
        t_warm = time.monotonic()
        warm = warm_pass(url, run.model, [q.request.prompt for q in phases["warm"]], run.concurrency,
                         f"{cfg.name} warm-up", [q.body for q in phases["warm"]])
        warm_s = time.monotonic() - t_warm
        before, _ = scrape_delta(url, scrape(url))  # once the warm-up's saves are counted
        out = {}
        for ph in PHASES:
            reqs = phases[ph]
            results, wall = run_trace(url, run.model, [q.request for q in reqs], run.concurrency,
                                      f"{cfg.name} {ph}", [q.body for q in reqs])
            before, delta = scrape_delta(url, before)
            out[ph] = phase_stats(reqs, results, wall, delta)
    return {"description": cfg.description, "role": cfg.role, "kvplug": source, "kvplug_imported_from": origin,
            "extra_config": extra, "server_start_s": start_s,
            "omp_core_ids": serving.omp_binding(log.read_text(errors="replace")),
            "warm_up": {"requests": len(warm), "wall_s": warm_s, "errors": sum(1 for r in warm if r.error)},
            "phases": out}


def run_case(cfgs: list[NbConfig], run: NbRun, phases: dict, info: dict) -> dict:
    """Every configuration in turn (a server that fails to start is tried once more, then
    skipped and listed); returns the report's "neighbours" section."""
    configs = {}
    for cfg in cfgs:
        for attempt in (1, 2):
            try:
                configs[cfg.name] = run_server(cfg, run, phases)
                break
            except serving.ServerError as e:
                print(f"  [{cfg.name}] server failed (attempt {attempt}): {str(e)[-600:]}", flush=True)
                time.sleep(10)
    rows = table_rows(configs)
    return {"before": {"nb_before": f"kvplug at git revision {run.before_rev} (git archive, first on the server's "
                                    "PYTHONPATH): synchronous disk/Redis loads, first-seen chunks prefilled in "
                                    "kvplug's own per-request loop",
                       "nb_sync": "this tree with async_loads false: synchronous disk/Redis loads only"},
            "before_rev": run.before_rev, "workload": info, "failed_configs": [c.name for c in cfgs
                                                                               if c.name not in configs],
            "configs": configs, "table": rows,
            "side_by_side": side_by_side(rows, {n: c["role"] for n, c in configs.items()}),
            "definitions": {
                "hit": "a request whose context is in the CPU tier (blend off for it): what neighbours must not slow",
                "hit_pXX_vs_alone": "the hits' TTFT percentile in this phase / in the alone phase, same server",
                "<after>_vs_<before>": "the after server's figure / the before server's, same phase and metric",
                "counters": "kvplug and vLLM prefix-cache counter deltas over the phase"}}


# ---------------------------------------------------------------- tables
TABLE_COLUMNS = ["config", "phase", "hits", "hit_ttft_p50_s", "hit_ttft_p90_s", "neighbours", "neighbour_ttft_p50_s",
                 "requests_per_s", "cpu_hit_tokens", "disk_hit_tokens", "remote_hit_tokens", "vllm_prefix_hit_rate",
                 "errors"]
ROW_KEYS = TABLE_COLUMNS[2:] + ["blend_requests", "blend_chunk_hits", "blend_chunk_misses", "load_errors"]
SIDE_METRICS = ("hit_ttft_p50_s", "hit_ttft_p90_s", "hit_p50_vs_alone", "hit_p90_vs_alone")


def _ratio(a, b) -> float:
    """a / b; NaN when either is missing or b is 0."""
    if a is None or b is None:
        return float("nan")
    return serving.ratio(a, b)


def table_rows(configs: dict[str, dict]) -> list[dict]:
    rows = []
    for name, c in configs.items():
        alone = c["phases"]["alone"]
        for ph, s in c["phases"].items():
            rows.append({"config": name, "phase": ph, **{k: s.get(k) for k in ROW_KEYS},
                         "hit_p50_vs_alone": _ratio(s["hit_ttft_p50_s"], alone["hit_ttft_p50_s"]),
                         "hit_p90_vs_alone": _ratio(s["hit_ttft_p90_s"], alone["hit_ttft_p90_s"])})
    return rows


def side_by_side(rows: list[dict], roles: dict[str, str]) -> list[dict]:
    """Per phase and metric, every server's figure and after / before for each before server."""
    after = [n for n, r in roles.items() if r == "after"]
    befores = [n for n, r in roles.items() if r == "before"]
    out = []
    for ph in PHASES:
        for m in SIDE_METRICS:
            if ph == "alone" and m.endswith("_vs_alone"):
                continue  # 1 by definition
            row = {"phase": ph, "metric": m, **{r["config"]: r[m] for r in rows if r["phase"] == ph}}
            row.update({f"{a}_vs_{b}": _ratio(row.get(a), row.get(b)) for a in after for b in befores})
            out.append(row)
    return out


def print_section(sec: dict) -> None:
    w, names = sec["workload"], list(sec["configs"])
    print(f"\nneighbours: {w['requests_per_phase']} requests per phase, concurrency {w['concurrency']}; "
          "hits = contexts held by the CPU tier")
    for name in names:
        print(f"  {name} ({sec['configs'][name]['role']}): {sec['configs'][name]['description']}; "
              f"kvplug from {sec['configs'][name]['kvplug_imported_from']}")
    serving.print_table(sec["table"], TABLE_COLUMNS)
    first = sec["side_by_side"][0] if sec["side_by_side"] else {}
    ratios = [k for k in first if k not in {"phase", "metric", *names}]
    print("\nhits' TTFT side by side (seconds; ratios: with neighbours / alone, after / before)")
    serving.print_table(sec["side_by_side"], ["phase", "metric", *names, *ratios])
    if sec["failed_configs"]:
        print(f"WARNING: neighbours servers that did not start: {sec['failed_configs']}")
