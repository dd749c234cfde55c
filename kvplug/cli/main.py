"""Argument parsing and dispatch of the `kvplug` command; every command returns an exit status.

    main(argv=None) -> int     parse, run, turn CliError into one line on stderr and status 2
    build_parser() -> ArgumentParser

Heavy modules (torch, vLLM) are imported by the commands that need them, never here.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict

from kvplug.cli.common import CliError, format_table, human_bytes

WARM_HELP = """\
Prefill every document once through an offline vLLM engine with the KVPlugConnector, so its
KV blocks are stored in DISK_PATH. Afterwards any engine started with the same disk_path (and
the same model, dtype and block size) loads them instead of recomputing: a query hits when it
BEGINS with the document's exact text (prefix caching; only whole blocks before the first
differing token are reused). With --blend each document is also stored as a blend chunk, so
engines started with "blend": true reuse it at any position in a prompt whose documents are
joined by the chunk separator.
"""


def _iso(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


_KIND_NAMES = {"block": "prefix blocks", "chunk": "blend chunks", "sglang": "SGLang pages"}


def _stats_text(s) -> str:
    kinds = [(f"  {_KIND_NAMES[k]}", f"{c['units']} ({human_bytes(c['bytes'])})") for k, c in s.kinds.items()
             if k != "sglang" or c["units"]]  # SGLang pages belong in a folder of their own: shown only when there
    rows = [("units", f"{s.units} ({human_bytes(s.bytes)})"), *kinds,
            ("ranks", ", ".join(f"r{k}: {v}" for k, v in sorted(s.ranks.items())) or "-"),
            ("oldest", _iso(s.oldest_mtime)), ("newest", _iso(s.newest_mtime)),
            ("corrupt", f"{s.corrupt}" + (" (an engine deletes these when it reads them; "
                                          "`kvplug clear` removes them)" if s.corrupt else "")),
            ("unreadable", str(s.unreadable)), ("temp files", str(s.tmp_files)),
            ("other files", f"{s.other_files}" + (" (not kvplug's; left alone)" if s.other_files else ""))]
    width = max(len(k) for k, _ in rows)
    lines = [f"kvplug cache {s.path}"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    # Layout fingerprints are long (backend, block shapes, dtype): one line each, count first.
    lines += ["  units per layout:"] + [f"    {v:>8}  {k}" for k, v in sorted(s.layouts.items())]
    return "\n".join(lines)


def cmd_stats(a: argparse.Namespace) -> int:
    if (a.disk_path is None) == (a.url is None):
        raise CliError("give either DISK_PATH (a cache directory) or --url http://host:port (a server)")
    if a.url is not None:
        return _stats_url(a)
    from kvplug.cli.cache_dir import scan

    s = scan(a.disk_path, verify=a.verify)
    if a.json:
        print(json.dumps({**asdict(s), "oldest": _iso(s.oldest_mtime), "newest": _iso(s.newest_mtime)},
                         indent=2, sort_keys=True))
    else:
        print(_stats_text(s))
    return 0


def _stats_url(a: argparse.Namespace) -> int:
    from kvplug.cli.metrics import derived, fetch_metrics, metrics_url, parse_counters

    counters = parse_counters(fetch_metrics(a.url, a.timeout))
    if not counters:
        raise CliError(f"{metrics_url(a.url)} has no vllm:kvplug_* counters: was the server started "
                       "with --kv-transfer-config naming KVPlugConnector?")
    extra = derived(counters)
    if a.json:
        print(json.dumps({"url": metrics_url(a.url), "counters": counters, "derived": extra},
                         indent=2, sort_keys=True))
        return 0
    rows = [{"counter": k, "value": v} for k, v in {**counters, **extra}.items()]
    print(f"kvplug counters at {metrics_url(a.url)} (summed over engines)")
    print(format_table(rows, ["counter", "value"]))
    return 0


def _confirm(n: int) -> bool:
    if not sys.stdin or not sys.stdin.isatty():
        raise CliError("stdin is not a terminal, so nothing was removed: pass --yes to remove "
                       "the files listed above")
    return input(f"Remove these {n} files? [y/N] ").strip().lower() in ("y", "yes")


def cmd_clear(a: argparse.Namespace) -> int:
    from kvplug.cli.cache_dir import apply_clear, plan_clear

    plan = plan_clear(a.disk_path, a.tmp_age)
    if not plan.files and not plan.dirs:
        print(f"nothing to remove in {a.disk_path}")
        return 0
    print(f"{a.disk_path}: {plan.unit_files} unit files ({human_bytes(plan.bytes)}), "
          f"{plan.tmp_files} stale temp files, {len(plan.dirs)} folders to remove")
    if not a.yes:
        for p in plan.files[:20]:
            print(f"  {p}")
        if len(plan.files) > 20:
            print(f"  ... and {len(plan.files) - 20} more")
        if not _confirm(len(plan.files)):
            print("nothing removed")
            return 1
    removed, failed = apply_clear(plan)
    for line in failed:
        print(f"could not remove {line}", file=sys.stderr)
    print(f"removed {removed} files from {a.disk_path}")
    return 1 if failed else 0


def cmd_warm(a: argparse.Namespace) -> int:
    from kvplug.cli.warm import report, warm

    print(report(warm(a)))
    return 0


def cmd_bench(args: list[str]) -> int:
    from kvplug.cli import bench

    return bench.run(args)


def _byte_count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes (e.g. 5e10)") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return int(value)


def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help="what a cache directory or a running server holds",
                       description="Summarise a kvplug disk cache (read-only: deletes nothing) "
                                   "or a running server's kvplug counters.")
    p.add_argument("disk_path", nargs="?", metavar="DISK_PATH", help="the engine's disk_path")
    p.add_argument("--url", help="a vLLM server, http://host:port: sums its vllm:kvplug_*_total samples")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--verify", action="store_true", help="also check every payload's CRC (reads all bytes)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for --url")
    p.set_defaults(func=cmd_stats)


def _add_clear(sub) -> None:
    p = sub.add_parser("clear", help="remove kvplug unit files from a cache directory",
                       description="Remove kvplug unit files (<2 hex>/<key>.r<rank>.kvp), stale temp "
                                   "files and the emptied folders; never anything else. Stop the "
                                   "engines using the directory first.")
    p.add_argument("disk_path", metavar="DISK_PATH")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    p.add_argument("--tmp-age", type=float, default=600.0,
                   help="seconds after which a temp file is stale (younger ones may be live writes)")
    p.set_defaults(func=cmd_clear)


def _add_warm(sub) -> None:
    p = sub.add_parser("warm", help="precompute and store the KV of documents",
                       description=WARM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("docs_dir", metavar="DOCS_DIR", help="folder of documents, one per file")
    p.add_argument("--model", required=True, help="the model the queries will be served with")
    p.add_argument("--disk-path", required=True, help="the disk_path the serving engines will use")
    p.add_argument("--disk-bytes", type=_byte_count, default=int(5e10), help="disk_bytes cap (5e10)")
    p.add_argument("--cpu-bytes", type=_byte_count, default=0,
                   help="CPU tier bytes (0: saves go straight to disk)")
    p.add_argument("--pattern", default="*.txt", help="which files of DOCS_DIR are documents")
    p.add_argument("--max-model-len", type=int, help="engine context length (default: the model's)")
    p.add_argument("--dtype", default="auto", help="must match the serving engines' dtype")
    p.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs (slower start)")
    p.add_argument("--wait-s", type=float, default=120.0, help="longest wait for disk writes")
    p.add_argument("--blend", action="store_true", help="also store each document as a blend chunk")
    p.add_argument("--chunk-separator", default=" # # ", help="the engines' chunk_separator (' # # ')")
    p.set_defaults(func=cmd_warm)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvplug", description="kvplug: KV-cache offload for vLLM - "
                                "inspect, clear and warm disk caches, run the benchmark.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_stats(sub)
    _add_clear(sub)
    _add_warm(sub)
    # Listed for --help only: main() forwards `bench ...` before argparse sees its options.
    sub.add_parser("bench", help="run benchmarks/offload.py (source checkout) with the given options",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        a = build_parser().parse_args(argv)
        return a.func(a)
    except CliError as e:
        print(f"kvplug: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvplug: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
