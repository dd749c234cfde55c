"""Kernel benchmarks: time every op of benchmarks/kernel_bench/ per available backend against
the measured device ceiling, print a table and write JSON.

    python benchmarks/kernels.py [--json PATH] [--quick] [--check] [--ops a,b] [--device cpu|cuda] [--threads N]
                                 [--budget-s S]

Ceilings are measured here, not looked up: copy bandwidth (a large device-to-device tensor
copy on CUDA, memcpy on CPU; bytes read + written), pinned host<->device copy bandwidth (CUDA;
bytes moved once; on CPU the copy ceiling stands in) and matmul throughput (bf16 on CUDA, fp32
on CPU). The JSON is rewritten after every case, so a run cut short keeps what it measured;
--budget-s stops starting new cases after that many seconds. "x torch" is the torch backend's time over this backend's (higher is faster).
On CPU, Triton runs interpreted and is far too slow to time at size: it is skipped unless
--ops names the op explicitly. Timings are medians of repeated runs after warm-up; the
machines are shared, so compare rows of one run, not runs.

Methods:
    measure_ceilings(dev, quick)     {"copy_GBps", "h2d_GBps", "d2h_GBps", "matmul_TFLOPs"}
    time_fn(fn, dev, quick)          median ms of fn()
    run_case(case, args, ceilings)   rows of one case (check, then time each backend)
    main(argv)                       CLI
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must precede any import of kvplug._triton: Triton reads it when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench  # noqa: E402
from kvplug.ops import _backend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, dev: torch.device, quick: bool) -> float:
    """Median milliseconds of fn() after warm-up; fewer repetitions for slow calls."""
    warmup, reps = (2, 15) if quick else (3, 20)
    for _ in range(warmup):
        fn()
    _sync(dev)
    start = time.perf_counter()
    fn()
    _sync(dev)
    if time.perf_counter() - start > 1.0:
        reps = 3
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def measure_ceilings(dev: torch.device, quick: bool) -> dict[str, float]:
    numel = (1 << 26 if quick else 1 << 29) if dev.type == "cuda" else (1 << 24 if quick else 1 << 26)
    src = torch.empty(numel, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), dev, quick)
    copy = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    h2d = d2h = copy
    if dev.type == "cuda":
        host = torch.empty(1 << (26 if quick else 28), dtype=torch.uint8, pin_memory=True).fill_(1)
        on_dev = torch.empty_like(host, device=dev)
        h2d = host.numel() / (time_fn(lambda: on_dev.copy_(host, non_blocking=True), dev, quick) * 1e-3) / 1e9
        d2h = host.numel() / (time_fn(lambda: host.copy_(on_dev, non_blocking=True), dev, quick) * 1e-3) / 1e9
        del host, on_dev
    n = 8192 if dev.type == "cuda" else 1024
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = time_fn(lambda: a @ b, dev, quick)
    return {"copy_GBps": copy, "h2d_GBps": h2d, "d2h_GBps": d2h, "matmul_TFLOPs": 2 * n ** 3 / (ms * 1e-3) / 1e12,
            "matmul_dtype": str(dtype)}


def discover():
    """(module name, module) for every module in kernel_bench/ not starting with "_"."""
    for info in sorted(pkgutil.iter_modules(kernel_bench.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        yield info.name, importlib.import_module(f"kernel_bench.{info.name}")


def module_cases(module, quick: bool):
    if hasattr(module, "cases"):
        return module.cases(quick)
    return list(getattr(module, "CASES", []))


def usable_backends(case, dev: torch.device, forced: bool) -> tuple[list[str], list[str]]:
    """Backends to time and notes on the ones skipped."""
    keep, notes = [], []
    for name in case.fns:
        if name == "cuda" and not (dev.type == "cuda" and _backend.has_cuda_op(case.cuda_op or case.op)):
            notes.append("cuda: kvplug._C not built with this op" if dev.type == "cuda" else "cuda: no GPU")
        elif name == "triton" and not _backend.has_triton():
            notes.append("triton: not installed")
        elif name == "triton" and dev.type != "cuda" and not forced:
            notes.append("triton: interpreted on CPU, skipped (name the op in --ops to force)")
        else:
            if name == "triton" and dev.type != "cuda":
                notes.append("triton: forced on CPU, runs interpreted: its times are not kernel speed")
            keep.append(name)
    return keep, notes


def _check(case, backend: str) -> str:
    if case.reset:
        case.reset()
    want = kernel_bench.clone_outputs(case.ref())
    if case.reset:
        case.reset()
    try:
        kernel_bench.compare(case.fns[backend](), want, case.tol)
    except AssertionError as err:
        return "FAIL: " + str(err).splitlines()[0][:120]
    return "ok"


def run_case(case, args, ceilings, forced: bool) -> tuple[list[dict], list[str]]:
    dev = kernel_bench.device()
    backends, notes = usable_backends(case, dev, forced)
    rows, torch_ms = [], None
    for backend in sorted(backends, key=lambda b: b != "torch"):  # torch first: the ratio base
        check = _check(case, backend) if args.check and backend not in case.unchecked else "-"
        ms = time_fn(case.fns[backend], dev, args.quick)
        torch_ms = ms if backend == "torch" else torch_ms
        row = {"op": case.op, "case": case.name, "backend": backend, "ms": ms, "check": check,
               "x_torch": (torch_ms / ms) if torch_ms else None}
        if case.bytes:
            row["GBps"] = case.bytes / (ms * 1e-3) / 1e9
            row["ceiling"] = case.ceiling
            row["pct_ceiling"] = 100 * row["GBps"] / ceilings[f"{case.ceiling}_GBps"]
        elif case.flops:
            row["TFLOPs"] = case.flops / (ms * 1e-3) / 1e12
            row["pct_ceiling"] = 100 * row["TFLOPs"] / ceilings["matmul_TFLOPs"]
        rows.append(row)
    return rows, notes + case.notes


def format_row(r: dict) -> str:
    rate = f"{r['GBps']:9.1f} GB/s" if "GBps" in r else (f"{r['TFLOPs']:7.3f} TFLOP/s" if "TFLOPs" in r else "-")
    x = f"{r['x_torch']:6.2f}x" if r.get("x_torch") else "     -"
    pct = f"{r['pct_ceiling']:5.1f}%" if "pct_ceiling" in r else "-"
    return f"{r['op']:<22} {r['case']:<30} {r['backend']:<8} {r['ms']:10.3f} {rate:>16} {x:>8} {pct:>7}  {r['check']}"


def device_label(dev: torch.device) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="output path (default benchmarks/results/kernels_<device>.json)")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU-friendly)")
    p.add_argument("--check", action="store_true", help="verify each backend against the reference first")
    p.add_argument("--ops", help="comma-separated op or module names; also forces interpreted Triton on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (on a shared few-core machine, 1 avoids "
                   "OpenMP oversubscription outliers of 100x)")
    p.add_argument("--budget-s", type=float, help="start no new case after this many seconds")
    return p.parse_args(argv)


def _write(out: Path, dev, args, ceilings, rows, notes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_label(dev), "torch": torch.__version__, "quick": args.quick,
                               "cpu_threads": torch.get_num_threads(),
                               "ceilings": ceilings, "results": rows, "notes": sorted(notes)}, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    kernel_bench.set_device(dev)
    only = set(args.ops.split(",")) if args.ops else None
    start = time.perf_counter()
    ceilings = measure_ceilings(dev, args.quick)
    print(f"device {device_label(dev)}: copy {ceilings['copy_GBps']:.1f} GB/s, h2d {ceilings['h2d_GBps']:.1f} GB/s, "
          f"d2h {ceilings['d2h_GBps']:.1f} GB/s, matmul {ceilings['matmul_TFLOPs']:.3f} TFLOP/s "
          f"({ceilings['matmul_dtype']})")
    print(f"{'op':<22} {'case':<30} {'backend':<8} {'time ms':>10} {'rate':>16} {'x torch':>8} {'% ceil':>7}  check")
    out = args.json or RESULTS / f"kernels_{device_label(dev)}.json"
    rows, notes = [], set()
    for mod_name, module in discover():
        for case in module_cases(module, args.quick):
            if only and case.op not in only and mod_name not in only:
                continue
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                notes.add(f"{case.op}: {case.name} not run: --budget-s {args.budget_s:g} spent")
                continue
            case_rows, case_notes = run_case(case, args, ceilings, forced=only is not None)
            for r in case_rows:
                print(format_row(r), flush=True)
            rows += case_rows
            notes.update(f"{case.op}: {n}" for n in case_notes)
            del case
            _write(out, dev, args, ceilings, rows, notes)
    for n in sorted(notes):
        print("note:", n)
    _write(out, dev, args, ceilings, rows, notes)
    print(f"wrote {out}")
    return 1 if any(r["check"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
