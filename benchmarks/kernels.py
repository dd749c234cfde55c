"""Kernel benchmarks: time every op of benchmarks/kernel_bench/ per available backend against
the measured device ceiling, print a table and write JSON.

    python benchmarks/kernels.py [--json PATH] [--quick] [--check] [--ops a,b] [--device cpu|cuda]
                                 [--threads N] [--budget-s S]

Timing (time_fn): warm-up calls, then batches of back-to-back calls, each batch between two CUDA
events (wall clock on CPU); a row's ms is the median over the batches of the time per call. What
the product does once (pointer tables, Triton compilation) happens in the warm-up; what it does
on every call (argument checks, dispatch) stays in the timed calls, and host_ms (the host's time
to issue one call) says when a row is bound by that rather than by the kernel.
Ceilings are measured here, not looked up. Per case: a torch copy of the case's own tensors
(Case.copies: the same bytes, device to device, or pinned host <-> device for the block path),
so a row's % is of the bandwidth those bytes get; run-wide: copy bandwidth of a large device
copy (memcpy on CPU; bytes read + written), pinned host<->device copy bandwidth (CUDA; bytes
moved once; on CPU the copy ceiling stands in), and matmul throughput (bf16 on CUDA, fp32 on
CPU), the share of which FLOP-bound rows report.
--check compares every backend with the case's reference on the device (nothing is copied to
the host but the rows of the block path, which live there). The JSON is rewritten after every
case, so a run cut short keeps what it measured; --budget-s stops starting new cases after that
many seconds; modules run in PRIORITY order (the figures the targets read first). "x torch" is
the torch backend's time over this backend's (higher is faster). On CPU, Triton runs
interpreted and is far too slow to time at size: it is skipped unless --ops names the op
explicitly. The machines are shared, so compare rows of one run, not runs.

Methods:
    time_fn(fn, dev, quick) -> dict       ms (median per call), ms_min, host_ms, iters, reps
    measure_ceilings(dev, quick)          {"copy_GBps", "h2d_GBps", "d2h_GBps", "matmul_TFLOPs"}
    case_ceiling(case, dev, quick)        GB/s of a torch copy of the case's tensors, or None
    run_case(case, args, ceilings)        rows of one case (check, then time each backend)
    main(argv)                            CLI
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
# Modules in the order they run: the ones the gpu-check targets read first (a run cut short by
# --budget-s or a time limit keeps them); modules not listed run after, by name.
PRIORITY = ("gather_scatter", "deviation_topk", "kmeans", "centroid_topk", "paged_io", "rope", "merge_clusters",
            "attend_merged")
BATCH_MS = {True: 5.0, False: 25.0}  # a timed batch lasts about this long (quick, full)
MAX_ITERS = 200


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _batch_ms(fn, dev: torch.device, iters: int) -> tuple[float, float | None]:
    """(device ms, host ms) per call of `iters` back-to-back calls; on CPU the two are one (None)."""
    if dev.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / iters, host * 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters, None


def time_fn(fn, dev: torch.device, quick: bool) -> dict:
    """Per-call time of fn(): warm-up, one call to size the batches, then `reps` batches of
    `iters` calls (a batch lasts about BATCH_MS); median and minimum over the batches."""
    for _ in range(2 if quick else 3):
        fn()
    _sync(dev)
    start = time.perf_counter()
    fn()
    _sync(dev)
    one = (time.perf_counter() - start) * 1e3
    target = BATCH_MS[quick]
    iters = max(1, min(MAX_ITERS, int(target / max(one, 1e-3))))
    reps = 3 if one > 1000 else 5 if one > 100 else (7 if quick else 9)
    runs = [_batch_ms(fn, dev, iters) for _ in range(reps)]
    ms = [r[0] for r in runs]
    host = [r[1] for r in runs if r[1] is not None]
    return {"ms": statistics.median(ms), "ms_min": min(ms), "host_ms": statistics.median(host) if host else None,
            "iters": iters, "reps": reps}


def measure_ceilings(dev: torch.device, quick: bool) -> dict[str, float]:
    numel = (1 << 26 if quick else 1 << 29) if dev.type == "cuda" else (1 << 24 if quick else 1 << 26)
    src = torch.empty(numel, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), dev, quick)["ms"]
    copy = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    h2d = d2h = copy
    if dev.type == "cuda":
        host = torch.empty(1 << (26 if quick else 28), dtype=torch.uint8, pin_memory=True).fill_(1)
        on_dev = torch.empty_like(host, device=dev)
        h2d = host.numel() / (time_fn(lambda: on_dev.copy_(host, non_blocking=True), dev, quick)["ms"] * 1e-3) / 1e9
        d2h = host.numel() / (time_fn(lambda: host.copy_(on_dev, non_blocking=True), dev, quick)["ms"] * 1e-3) / 1e9
        del host, on_dev
    n = 8192 if dev.type == "cuda" else 1024
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = time_fn(lambda: a @ b, dev, quick)["ms"]
    return {"copy_GBps": copy, "h2d_GBps": h2d, "d2h_GBps": d2h, "matmul_TFLOPs": 2 * n ** 3 / (ms * 1e-3) / 1e12,
            "matmul_dtype": str(dtype)}


def discover():
    """(module name, module) for every module in kernel_bench/ not starting with "_", PRIORITY first."""
    names = [i.name for i in pkgutil.iter_modules(kernel_bench.__path__) if not i.name.startswith("_")]
    rank = {n: i for i, n in enumerate(PRIORITY)}
    for name in sorted(names, key=lambda n: (rank.get(n, len(rank)), n)):
        yield name, importlib.import_module(f"kernel_bench.{name}")


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


def _check(case, backend: str, want) -> str:
    if case.reset:
        case.reset()
    try:
        kernel_bench.compare(case.fns[backend](), want, case.tol)
    except AssertionError as err:
        return "FAIL: " + str(err).splitlines()[0][:120]
    return "ok"


def _reference(case):
    if case.reset:
        case.reset()
    return kernel_bench.clone_outputs(case.ref())


def case_ceiling(case, dev: torch.device, quick: bool) -> float | None:
    """GB/s of a torch copy of the case's own tensors (Case.copies), counted as the case counts its
    bytes: read + written on the device ("copy"), moved once between host and device."""
    if not case.copies:
        return None
    nbytes = sum(src.numel() * src.element_size() for _, src in case.copies)

    def copy():
        for dst, src in case.copies:
            dst.copy_(src, non_blocking=True)
    ms = time_fn(copy, dev, quick)["ms"]
    return (2 if case.ceiling == "copy" else 1) * nbytes / (ms * 1e-3) / 1e9


def _rates(row: dict, case, ceilings: dict, own: float | None) -> None:
    ms = row["ms"]
    if case.bytes:
        row["GBps"] = case.bytes / (ms * 1e-3) / 1e9
        row["ceiling"] = case.ceiling
        row["ceiling_GBps"] = own if own else ceilings[f"{case.ceiling}_GBps"]
        row["ceiling_of"] = "this case's tensors" if own else "the run-wide copy"
        row["pct_ceiling"] = 100 * row["GBps"] / row["ceiling_GBps"]
    elif case.flops:
        row["TFLOPs"] = case.flops / (ms * 1e-3) / 1e12
        row["pct_ceiling"] = 100 * row["TFLOPs"] / ceilings["matmul_TFLOPs"]


def run_case(case, args, ceilings, forced: bool) -> tuple[list[dict], list[str]]:
    dev = kernel_bench.device()
    backends, notes = usable_backends(case, dev, forced)
    want = _reference(case) if args.check and set(backends) - set(case.unchecked) else None
    own = case_ceiling(case, dev, args.quick) if case.bytes else None
    rows, torch_ms = [], None
    for backend in sorted(backends, key=lambda b: b != "torch"):  # torch first: the ratio base
        check = _check(case, backend, want) if want is not None and backend not in case.unchecked else "-"
        timing = time_fn(case.fns[backend], dev, args.quick)
        torch_ms = timing["ms"] if backend == "torch" else torch_ms
        row = {"op": case.op, "case": case.name, "backend": backend, **timing, "check": check,
               "x_torch": (torch_ms / timing["ms"]) if torch_ms else None}
        _rates(row, case, ceilings, own)
        rows.append(row)
    return rows, notes + case.notes


def format_row(r: dict) -> str:
    rate = f"{r['GBps']:9.1f} GB/s" if "GBps" in r else (f"{r['TFLOPs']:7.3f} TFLOP/s" if "TFLOPs" in r else "-")
    x = f"{r['x_torch']:6.2f}x" if r.get("x_torch") else "     -"
    pct = f"{r['pct_ceiling']:5.1f}%" if "pct_ceiling" in r else "-"
    # the host took about as long to issue a call as the device to run it: dispatch, not the kernel, bounds it
    bound = "  launch-bound" if r.get("host_ms") is not None and r["host_ms"] >= 0.9 * r["ms"] else ""
    return f"{r['op']:<22} {r['case']:<30} {r['backend']:<8} {r['ms']:10.3f} {rate:>16} {x:>8} {pct:>7}  {r['check']}" \
        + bound


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
