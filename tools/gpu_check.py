"""`make gpu-check`: the one prepared check for a GPU machine (H100/H200 with torch, triton and
nvcc; no vLLM, no network), at most ~8 minutes, then a one-screen summary.

    python3 tools/gpu_check.py [--dry-run] [--out DIR] [--budget-s 470] [--parts build,tests,blend,bench]

Parts, each in its own process with its own time limit (a failing part never stops the next):
    build   python setup.py build_ext --inplace (sm_90 only, ninja's parallel jobs), then import
            kvplug._C and list the ops it registers; torch's cpp_extension.load if setup.py fails
    tests   pytest tests/ops, tests/tiers/test_paged_io.py and tests/tiers/test_block_io.py with
            TRITON_INTERPRET=0: every op, backend (torch, triton, cuda) and dtype on CUDA tensors,
            the block IO path on CUDA (side streams, fences, pinned rows) and the worker's block
            path over it against the opaque path; test_cuda_compile is CI's (CPU) and is left out
    blend   tools/blend_check.py: the blender on a random-weight Llama-3.2-1B-shaped model in
            bf16 (and a tiny fp32 one), SDPA path, writing through the canonical path's all-layer
            methods, against the reference forward and against per-layer writes
    bench   benchmarks/kernels.py --check -> benchmarks/results/kernels_gpu.json: per op and
            backend time, GB/s, the measured copy ceiling, % of it, x torch (LMCache beside where
            it imports), read against the issue's targets (tools/gpu_summary.py)
--dry-run runs every part that a CPU can, in about a minute (CI runs it): no build, the test
selection collected (and the layout and block IO tests run), the blend checks on a tiny model,
the benchmark at --quick sizes. It never writes into benchmarks/results.

Output (DIR: --out, else $OUT when set, else benchmarks/results/gpu_check): gpu_check.json (all
of it), gpu_check_summary.txt, gpu_check.log (every part's output), junit.xml, kernels_gpu.json.

Methods:
    run_part(name, cmd, timeout_s, ctx) -> (rc, seconds, output)   one subprocess, logged
    part_build / part_tests / part_blend / part_bench (ctx) -> dict  status, seconds, detail
    main(argv)      exit 1 when a part fails (a missed target is reported, not failed)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("build", "tests", "blend", "bench")
CAPS_S = {"build": 200, "tests": 170, "blend": 90, "bench": 240}  # each part's own limit
FLOOR_S = {"build": 30, "tests": 30, "blend": 20, "bench": 40}  # kept for the parts after one
TEST_PATHS = ["tests/ops", "tests/tiers/test_paged_io.py", "tests/tiers/test_block_io.py"]
OPS = ("gather_chunks", "scatter_chunks", "rerotate_and_scatter", "rerotate_keys", "deviation_topk",
       "kmeans_step", "centroid_topk", "merge_clusters")


@dataclass
class Ctx:
    dry: bool
    out: Path
    deadline: float
    parts: tuple[str, ...]
    log: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    triton_note: str = ""

    def timeout(self, name: str) -> float:
        later = sum(FLOOR_S[p] for p in self.parts[self.parts.index(name) + 1:])
        return max(5.0, min(CAPS_S[name], self.deadline - time.monotonic() - later))


def run_part(name: str, cmd: list[str], timeout_s: float, ctx: Ctx, env: dict | None = None):
    start = time.monotonic()
    ctx.log.append(f"==== {name}: {' '.join(cmd)}  (limit {timeout_s:.0f} s)")
    try:
        p = subprocess.run(cmd, cwd=ROOT, env={**ctx.env, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout_s)
        rc, output = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        rc, output = 124, (out.decode(errors="replace") if isinstance(out, bytes) else out) + "\n[timed out]"
    seconds = time.monotonic() - start
    ctx.log.append(output.rstrip() + f"\n==== {name}: rc {rc} in {seconds:.1f} s\n")
    return rc, seconds, output


def _result(name, status, seconds, detail, **extra) -> dict:
    return dict(name=name, status=status, seconds=seconds, detail=detail, **extra)


def ensure_triton_package(ctx: Ctx) -> str:
    """Our Triton kernels install as kvplug._triton (setup.py's package_dir). Where kvplug is not
    installed (the GPU machine), link kvplug/_triton -> ../triton_kernels (git-ignored). Once,
    after the build (setup.py's find_packages would otherwise see the link as a package too)."""
    if ctx.triton_note:
        return ctx.triton_note
    ctx.triton_note = _link_triton(ctx)
    ctx.log.append(f"==== {ctx.triton_note}")
    return ctx.triton_note


def _link_triton(ctx: Ctx) -> str:
    probe = [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('kvplug._triton') is not None)"]
    found = subprocess.run(probe, cwd=ROOT, env=ctx.env, capture_output=True, text=True).stdout.strip() == "True"
    if found:
        return "kvplug._triton importable"
    link = ROOT / "kvplug" / "_triton"
    try:
        link.symlink_to(Path("..") / "triton_kernels", target_is_directory=True)
    except OSError:
        shutil.copytree(ROOT / "triton_kernels", link)
    return "linked kvplug/_triton -> triton_kernels"


def _list_ops(ctx: Ctx) -> list[str]:
    code = ("from kvplug.ops import _backend; import sys; "
            f"print(','.join(o for o in {OPS!r} if _backend.has_cuda_op(o)))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ctx.env, capture_output=True, text=True)
    return [o for o in p.stdout.strip().split(",") if o]


def _load_build_cmd() -> list[str]:
    """torch's cpp_extension.load over csrc/, run in the tree's root; it opens <build_directory>/lock
    first and never makes the folder itself."""
    code = ("import glob, os, shutil, sysconfig, torch.utils.cpp_extension as c; "
            "os.makedirs('build/gpu_check_ext', exist_ok=True); "
            "m = c.load(name='_C', sources=sorted(glob.glob('csrc/*.cu') + glob.glob('csrc/*.cpp')), "
            "extra_include_paths=['csrc/include'], extra_cflags=['-O3'], build_directory='build/gpu_check_ext', "
            "extra_cuda_cflags=['-O3', '--use_fast_math', '-gencode=arch=compute_90,code=sm_90'], verbose=True); "
            "shutil.copy(m.__file__, 'kvplug/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
    return [sys.executable, "-c", code]


def part_build(ctx: Ctx) -> dict:
    if ctx.dry:
        return _result("build", "skip", 0.0, "dry run: no CUDA here (CI compiles csrc/ in test_cuda_compile)")
    (ROOT / "build").mkdir(exist_ok=True)
    env = {"KVPLUG_CUDA_ARCHS": "90", "MAX_JOBS": str(os.cpu_count() or 8)}
    rc, seconds, _ = run_part("build", [sys.executable, "setup.py", "build_ext", "--inplace"], ctx.timeout("build"),
                              ctx, env)
    how = "setup.py build_ext --inplace"
    if rc != 0 or not _list_ops(ctx):
        rc, more, _ = run_part("build (cpp_extension.load)", _load_build_cmd(), ctx.timeout("build"), ctx, env)
        seconds, how = seconds + more, "cpp_extension.load (setup.py failed, see the log)"
    ops = _list_ops(ctx)
    status = "ok" if rc == 0 and set(ops) == set(OPS) else "FAIL"
    note = ensure_triton_package(ctx)
    return _result("build", status, seconds, f"{how}: kvplug._C has {len(ops)}/{len(OPS)} ops; {note}", ops=ops)


def _junit(path: Path) -> dict:
    counts = dict(tests=0, failures=0, errors=0, skipped=0, cuda=0, triton=0)
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        counts["tests"] += 1
        kinds = {c.tag for c in case}
        counts["failures"] += "failure" in kinds
        counts["errors"] += "error" in kinds
        counts["skipped"] += "skipped" in kinds
        if not kinds & {"failure", "error", "skipped"}:
            name = case.get("name", "")
            counts["cuda"] += "cuda" in name
            counts["triton"] += "triton" in name
    return counts


def part_tests(ctx: Ctx) -> dict:
    base = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *TEST_PATHS,
            "--ignore=tests/ops/test_cuda_compile.py"]
    if ctx.dry:  # the selection must collect; the layout and block IO tests are quick enough to run
        rc, seconds, out = run_part("tests (collect)", base + ["--collect-only"], ctx.timeout("tests"), ctx)
        collected = next((ln for ln in out.splitlines()[::-1] if "collected" in ln or "tests" in ln), "").strip()
        rc2, more, out2 = run_part("tests (run)", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                   "tests/ops/test_kv_layout.py", "tests/tiers/test_paged_io.py",
                                                   "tests/tiers/test_block_io.py"],
                                   ctx.timeout("tests"), ctx)
        ran = out2.strip().splitlines()[-1] if out2.strip() else "no output"
        status = "ok" if rc == 0 and rc2 == 0 else "FAIL"
        return _result("tests", status, seconds + more, f"collected on CUDA selection: {collected}; ran: {ran}")
    ensure_triton_package(ctx)
    junit = ctx.out / "junit.xml"
    xdist = ["-n", str(min(8, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
    rc, seconds, out = run_part("tests", base + xdist + [f"--junitxml={junit}"], ctx.timeout("tests"), ctx,
                                {"TRITON_INTERPRET": "0"})
    c = _junit(junit)
    detail = (f"{c['tests'] - c['failures'] - c['errors'] - c['skipped']} passed, {c['failures']} failed, "
              f"{c['errors']} errors, {c['skipped']} skipped; passed with a cuda/triton id: {c['cuda']}/{c['triton']}")
    status = "ok" if rc == 0 and c["tests"] and c["cuda"] else "FAIL"
    return _result("tests", status, seconds, detail + ("" if rc != 124 else "; TIMED OUT"), counts=c)


def part_blend(ctx: Ctx) -> dict:
    runs = [("cpu", "float32", "tiny"), ("cpu", "bfloat16", "tiny")] if ctx.dry else \
        [("cuda", "bfloat16", "llama-1b"), ("cuda", "float32", "tiny")]
    checks, seconds, status, detail = [], 0.0, "ok", []
    if not ctx.dry:
        ensure_triton_package(ctx)
    for device, dtype, shape in runs:
        path = ctx.out / f"blend_{shape}_{dtype}.json"
        rc, s, _ = run_part(f"blend {shape} {dtype}", [sys.executable, "tools/blend_check.py", "--device", device,
                                                      "--dtype", dtype, "--shape", shape, "--json", str(path)],
                            ctx.timeout("blend"), ctx)
        seconds += s
        got = json.loads(path.read_text())["checks"] if path.exists() else []
        path.unlink(missing_ok=True)  # its lines are in gpu_check.json: $OUT returns 8 files at most
        checks.append(dict(device=device, dtype=dtype, shape=shape, rc=rc, checks=got))
        bad = [c["name"] for c in got if not c["ok"]] or ([] if rc == 0 else [f"rc {rc}"])
        status = "FAIL" if bad or not got else status
        errs = " ".join(f"{c['name']} {gpu_summary._fmt(c['error'], '.2g')}" for c in got if c["name"] != "partial")
        detail.append(f"{shape} {dtype}: {'ok' if not bad else 'FAIL ' + ','.join(bad)} ({errs})")
    return _result("blend", status, seconds, "; ".join(detail), runs=checks)


def part_bench(ctx: Ctx) -> dict:
    target = ctx.out / "kernels_dry.json" if ctx.dry else ROOT / "benchmarks" / "results" / "kernels_gpu.json"
    budget = ctx.timeout("bench")
    if not ctx.dry:
        ensure_triton_package(ctx)
    cmd = [sys.executable, "benchmarks/kernels.py", "--check", "--json", str(target), "--budget-s", f"{budget - 30:.0f}"]
    cmd += ["--quick", "--device", "cpu", "--threads", "1"] if ctx.dry else ["--device", "cuda"]
    rc, seconds, _ = run_part("bench", cmd, budget, ctx)
    bench = json.loads(target.read_text()) if target.exists() else {}
    if not ctx.dry and target.exists():
        shutil.copy(target, ctx.out / "kernels_gpu.json")
    rows = bench.get("results", [])
    fails = [f"{r['op']}/{r['backend']}" for r in rows if r["check"].startswith("FAIL")]
    skipped = [n for n in bench.get("notes", []) if "not run" in n]
    status = "ok" if rows and not fails and rc == 0 else "FAIL"
    detail = f"{len(rows)} rows, check failures: {', '.join(fails) or 'none'}" + \
        (f"; {len(skipped)} cases not run (budget)" if skipped else "") + ("; TIMED OUT" if rc == 124 else "")
    return _result("bench", status, seconds, detail, bench=bench)


PART_FNS = {"build": part_build, "tests": part_tests, "blend": part_blend, "bench": part_bench}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU parts only, quick (what CI runs)")
    p.add_argument("--out", type=Path, help="output folder (default $OUT, else benchmarks/results/gpu_check)")
    p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget for all parts")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    return p.parse_args(argv)


def _device() -> tuple[str, str]:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return name, torch.__version__


def _run_parts(ctx: Ctx) -> list[dict]:
    results = []
    for name in ctx.parts:
        start = time.monotonic()
        try:
            results.append(PART_FNS[name](ctx))
        except Exception as exc:  # noqa: BLE001 - the check itself broke: say where, run the rest
            ctx.log.append(f"==== {name}: gpu_check error {type(exc).__name__}: {exc}")
            results.append(_result(name, "FAIL", time.monotonic() - start, f"gpu_check error: {exc}"[:200]))
    return results


def _report(ctx: Ctx, parts: list[dict], started: float, budget: float) -> dict:
    device, version = _device()
    bench = next((p.pop("bench") for p in parts if "bench" in p), {})
    return dict(mode="dry-run" if ctx.dry else "full", device=device, torch=version, budget_s=budget,
                seconds=time.monotonic() - started, parts=parts, targets=gpu_summary.evaluate(bench) if bench else [],
                ceilings=bench.get("ceilings", {}), peers=gpu_summary.peers(bench) if bench else [],
                bench_notes=bench.get("notes", []))


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    if not set(parts) <= set(PARTS):
        raise SystemExit(f"--parts {args.parts!r}: allowed are {', '.join(PARTS)}")
    dry = args.dry_run
    if not dry and _device()[0].startswith("cpu"):
        raise SystemExit("no CUDA device here: run with --dry-run (CPU parts only)")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():  # setup.py looks on PATH
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/local/cuda/bin"])
    ctx = Ctx(dry=dry, out=out, deadline=started + args.budget_s, parts=parts, env=env)
    if not dry:  # compiled Triton on CUDA tensors, whatever the caller's environment says
        ctx.env["TRITON_INTERPRET"] = "0"
    report = _report(ctx, _run_parts(ctx), started, args.budget_s)
    report["files"] = sorted(f.name for f in out.iterdir() if f.is_file()) + ["gpu_check.json", "gpu_check.log",
                                                                             "gpu_check_summary.txt"]
    report["files"] = sorted(set(report["files"]))
    text = gpu_summary.summary(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.log").write_text("\n".join(ctx.log))
    (out / "gpu_check_summary.txt").write_text(text + "\n")
    print(text)
    return 0 if all(p["status"] in ("ok", "skip") for p in report["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
