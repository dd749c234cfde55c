"""SGLang HiCache storage backends side by side: kvplug (disk; disk + Redis) against SGLang's built-in
HiCacheFile, on the same pages of the same host pool, in one run; results as ratios to HiCacheFile.

Each backend moves pages between a host pool and its storage the way SGLang's cache controller does:
kvplug through the zero-copy v1 interface (batch_set_v1 / batch_get_v1 on host slots), HiCacheFile
through the generic one (get_data_page + batch_set; batch_get into dummy pages +
set_from_flat_data_page), so both sides include the host-pool copies. Per round every backend gets
fresh keys; the order of the backends rotates from round to round (the machine is shared and
noisy). Timed per batch: batch_set (for kvplug the call, which queues the writes, and separately
the time until they are on disk), batch_exists (all hits), batch_get. Reads hit the OS page cache
(files written moments before): this compares the backends' own costs, not the disk. "kvplug
disk+Redis, cold disk" is a second engine with an empty disk_path reading the same pages from Redis.

    python benchmarks/sglang_storage.py [--quick] [--pages N] [--batch B] [--rounds R] [--json PATH]

The host pool is the tests' copy of SGLang's MHA host pool page methods (tests/sglang/
sglang_host_pool.py): SGLang's own pool cannot be built on a CPU-only box (see the README).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "sglang"), str(ROOT / "tests")]

from redis_server import RedisServer  # noqa: E402
from sglang_helpers import file_backend, kvplug_backend, sglang_keys, slots  # noqa: E402
from sglang_host_pool import MHAHostPool, fill_random, page_bytes  # noqa: E402

# SmolLM2-135M (the project's test model): 30 layers, 3 KV heads of 64, bf16; SGLang's page of 64 tokens.
COLD = "kvplug disk+Redis, cold disk"
SHAPE = dict(layers=30, heads=3, head_dim=64, page_size=64, dtype=torch.bfloat16)


class FileSide:
    """HiCacheFile driven as SGLang's controller drives a non-v1 backend."""

    def __init__(self, pool, path):
        self.pool, self.b = pool, file_backend(pool, path)

    def set(self, keys, pages):
        return self.b.batch_set(keys, [self.pool.get_data_page(p * self.pool.page_size) for p in pages])

    def get(self, keys, pages):
        got = self.b.batch_get(keys, [self.pool.get_dummy_flat_data_page() for _ in keys])
        for p, t in zip(pages, got):
            if t is not None:
                self.pool.set_from_flat_data_page(p * self.pool.page_size, t)
        return [t is not None for t in got]

    def exists(self, keys):
        return self.b.batch_exists(keys)

    def flush(self):
        pass

    def clear(self):
        self.b.clear()

    def close(self):
        pass


class KVPlugSide:
    def __init__(self, pool, **extra):
        self.pool, self.b = pool, kvplug_backend(pool, **extra)

    def set(self, keys, pages):
        return all(self.b.batch_set_v1(keys, slots(self.pool, pages)))

    def get(self, keys, pages):
        return self.b.batch_get_v1(keys, slots(self.pool, pages))

    def exists(self, keys):
        return self.b.batch_exists(keys)

    def flush(self):
        self.b.flush()

    def clear(self):
        self.b.clear()

    def close(self):
        self.b.close()


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def one_round(side, pool, keys, pages, batch, dest, reader=None):
    """Set, flush, exists, get of `keys` in batches; returns per-batch seconds of each op."""
    t = {"set": [], "written": [], "exists": [], "get": []}
    want = [page_bytes(pool, p * pool.page_size) for p in pages]
    t_all = time.perf_counter()
    for i in range(0, len(keys), batch):
        ok, s = timed(side.set, keys[i:i + batch], pages[i:i + batch])
        assert ok, "batch_set failed"
        t["set"].append(s)
    side.flush()
    t["written"].append(time.perf_counter() - t_all)
    fill_random(pool, torch.Generator().manual_seed(len(keys)))  # the reads must bring the bytes back
    src = reader or side
    for i in range(0, len(keys), batch):
        n, s = timed(src.exists, keys[i:i + batch])
        assert n == len(keys[i:i + batch]), f"batch_exists found {n}"
        t["exists"].append(s)
    for i in range(0, len(keys), batch):
        ok, s = timed(src.get, keys[i:i + batch], dest[i:i + batch])
        assert all(ok), "batch_get missed"
        t["get"].append(s)
    got = [page_bytes(pool, p * pool.page_size) for p in dest]
    assert got == want, "pages came back with other bytes"
    return t


def summarize(times: dict, n_pages: int, batch: int, page_nbytes: int) -> dict:
    """Latency percentiles per call ("written": per round, all its sets until on disk) and throughput
    over all n_pages (every op moves each page once)."""
    out = {}
    for op, secs in times.items():
        total = sum(secs)
        out[op] = {"p50_ms": 1e3 * statistics.median(secs), "p90_ms": 1e3 * _p90(secs),
                   "pages_per_s": n_pages / total if total else 0.0,
                   "gb_per_s": n_pages * page_nbytes / total / 1e9 if total else 0.0}
    return out


def _p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def run(args) -> dict:
    pool = MHAHostPool(pages=2 * args.pages, **SHAPE)
    fill_random(pool, torch.Generator().manual_seed(0))
    page_nbytes = pool.get_dummy_flat_data_page().numel() * pool.dtype.itemsize
    work = Path(tempfile.mkdtemp(prefix="kvplug-sglang-bench-", dir=args.workdir))
    with RedisServer(work / "redis") as redis:
        sides = {"HiCacheFile": FileSide(pool, work / "file"),
                 "kvplug disk": KVPlugSide(pool, disk_path=str(work / "kv"), disk_bytes=1e12),
                 "kvplug disk+Redis": KVPlugSide(pool, disk_path=str(work / "kvr"), disk_bytes=1e12,
                                                 remote_url=redis.url, remote_timeout_ms=1000)}
        cold = KVPlugSide(pool, disk_path=str(work / "cold"), disk_bytes=1e12, remote_url=redis.url,
                          remote_timeout_ms=1000)
        names = list(sides) + [COLD]
        times = {n: {"set": [], "written": [], "exists": [], "get": []} for n in names}
        pages, dest = list(range(args.pages)), list(range(args.pages, 2 * args.pages))
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                keys = sglang_keys(list(range((r * 10 + names.index(name)) * 10**7,
                                              (r * 10 + names.index(name)) * 10**7 + args.pages * pool.page_size)),
                                   pool.page_size)
                side = sides.get(name, sides["kvplug disk+Redis"])
                t = one_round(side, pool, keys, pages, args.batch, dest, reader=cold if name not in sides else None)
                for op in t:
                    times[name][op] += t[op]
                side.clear()
                cold.clear()
        for s in [*sides.values(), cold]:
            s.close()
    results = {n: summarize(times[n], args.pages * args.rounds, args.batch, page_nbytes) for n in names}
    return {"config": {**vars(args), "page_bytes": page_nbytes, "shape": {k: str(v) for k, v in SHAPE.items()}},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                        "sglang": _version("sglang")},
            "results": results, "ratios_vs_hicachefile": ratios(results)}


def ratios(results: dict) -> dict:
    """Throughput of each kvplug configuration over HiCacheFile's (> 1: kvplug moves more pages/s)."""
    base = results["HiCacheFile"]
    out = {n: {op: r[op]["pages_per_s"] / base[op]["pages_per_s"] for op in ("set", "written", "exists", "get")}
           for n, r in results.items() if n != "HiCacheFile"}
    for op in ("set", "written"):  # the cold-disk engine only reads: its writes are disk+Redis's
        out[COLD].pop(op)
    return out


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def table(report: dict) -> str:
    rows = ["| backend | batch_set call p50 | set until on disk | batch_exists p50 | batch_get p50 | get GB/s | "
            "set / exists / get pages/s vs HiCacheFile |", "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        rat = report["ratios_vs_hicachefile"].get(name, {"written": 1, "exists": 1, "get": 1})
        set_rat = f"{rat['written']:.2f}x" if "written" in rat else "-"
        sets = ("-", "-") if name == COLD else (f"{r['set']['p50_ms']:.1f} ms", f"{r['written']['gb_per_s']:.2f} GB/s")
        rows.append(f"| {name} | {sets[0]} | {sets[1]} | {r['exists']['p50_ms']:.2f} ms | {r['get']['p50_ms']:.1f} ms | "
                    f"{r['get']['gb_per_s']:.2f} | {set_rat} / {rat['exists']:.2f}x / {rat['get']:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 pages, 2 rounds")
    ap.add_argument("--pages", type=int, default=256, help="pages per backend per round")
    ap.add_argument("--batch", type=int, default=64, help="pages per call (SGLang sends at most 128)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the folders go (default: the temp dir)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sglang_storage.json"))
    args = ap.parse_args()
    if args.quick:
        args.pages, args.rounds = 64, 2
    report = run(args)
    print(table(report))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
